"""A tensorflow-datasets builder for Anthropic's HH-RLHF preference data, usable without TensorFlow.

The builder has one config per preference subset (harmless_base, helpful_base,
helpful_online, helpful_rejection_sampled), each with train and test splits. It reads a local
copy when one is given, laid out like the official repository
(`<local_dir>/<subset>/<split>.jsonl.gz`, or `.jsonl`), and otherwise downloads the files from
github.com/anthropics/hh-rlhf.

With tensorflow-datasets 4.9.10 and no TensorFlow installed, preparing works with
`file_format="array_record"` and reading works through `builder.as_data_source(split)`;
`builder.as_dataset` needs TensorFlow. `load_hh_rlhf` uses exactly that path.

Example:
    comparisons = load_hh_rlhf("harmless-base", "train", data_dir="~/tensorflow_datasets",
                               skip_invalid=True)
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

try:
    import importlib_resources  # noqa: F401
except ImportError as error:
    raise ImportError(
        "tensorflow-datasets 4.9.10 needs the package importlib_resources to prepare a dataset "
        "whose builder is defined in a package, but declares it only for Python < 3.9. "
        "Install it with `pip install importlib_resources`."
    ) from error

from llama_rlhf.data.chat import Message
from llama_rlhf.data.hh_rlhf import SUBSETS, check_subset, comparison_from_hh_record
from llama_rlhf.data.preferences import Comparison, PreferenceLevel, ReadSummary, read_jsonl_records

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

# NOTE: these URLs were never fetched from the development machine, which has no internet
# access. The helpful-* files of the repository are reportedly stored with Git LFS, so they
# come from the media endpoint. For LFS files raw.githubusercontent.com returns only a small
# pointer, which the builder detects and rejects.
_RAW_URL = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/{subset}/{split}.jsonl.gz"
_LFS_URL = (
    "https://media.githubusercontent.com/media/anthropics/hh-rlhf/master/{subset}/{split}.jsonl.gz"
)
_URL_TEMPLATES = {
    "harmless-base": _RAW_URL,
    "helpful-base": _LFS_URL,
    "helpful-online": _LFS_URL,
    "helpful-rejection-sampled": _LFS_URL,
}
_LFS_POINTER_START = b"version https://git-lfs"

_CITATION = """\
@article{bai2022training,
  title={Training a Helpful and Harmless Assistant with Reinforcement Learning from Human
         Feedback},
  author={Bai, Yuntao and others},
  journal={arXiv preprint arXiv:2204.05862},
  year={2022}
}"""


def config_name(subset: str) -> str:
    """Return the builder config name of an HH-RLHF subset ("harmless-base" -> "harmless_base")."""
    check_subset(subset)
    return subset.replace("-", "_")


class HhRlhfConfig(tfds.core.BuilderConfig):
    """Builder config for one HH-RLHF subset."""

    def __init__(self, *, subset: str, **kwargs):
        super().__init__(name=config_name(subset), **kwargs)
        self.subset = subset


class HhRlhf(tfds.core.GeneratorBasedBuilder):
    """Anthropic HH-RLHF comparisons as `Comparison`-shaped examples.

    Each example contains the dialog context (roles "user"/"assistant"), the chosen and rejected
    answers, `is_safety_prompt` (True for harmless-base), `level` (always "unknown"), and
    `line`, the 1-based line of the pair in the source file.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        HhRlhfConfig(
            subset=subset,
            description=f"HH-RLHF {subset} ({'safety' if safety else 'helpfulness'} prompts).",
        )
        for subset, safety in SUBSETS.items()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Optional. To build without network access, put a copy of the subset folders of
https://github.com/anthropics/hh-rlhf into the manual directory, for example
<manual_dir>/harmless-base/train.jsonl.gz and <manual_dir>/harmless-base/test.jsonl.gz.
"""

    def __init__(
        self,
        *,
        local_dir: str | os.PathLike | None = None,
        skip_invalid: bool = False,
        **kwargs,
    ):
        """Create the builder.

        Args:
            local_dir: Folder with a local copy laid out like the official repository. When
                None, a non-empty `download_config.manual_dir` is used as the local copy,
                and without one the files are downloaded.
            skip_invalid: Skip malformed pairs (counted in the log and in
                `info.metadata["skipped"]`) instead of failing the preparation.
            **kwargs: Passed to `tfds.core.GeneratorBasedBuilder`, for example `data_dir`
                and `config`. `file_format` defaults to "array_record", the format that
                needs no TensorFlow.
        """
        self._local_dir = None if local_dir is None else pathlib.Path(local_dir).expanduser()
        self._skip_invalid = skip_invalid
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Human preference comparisons between two assistant answers to the same "
                "multi-turn dialog, from Anthropic's HH-RLHF release."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "context": tfds.features.Sequence(
                        {"role": tfds.features.Text(), "content": tfds.features.Text()}
                    ),
                    "chosen": tfds.features.Text(),
                    "rejected": tfds.features.Text(),
                    "is_safety_prompt": tfds.features.Scalar(dtype=np.bool_),
                    "level": tfds.features.ClassLabel(
                        names=[level.label for level in PreferenceLevel]
                    ),
                    "line": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            homepage="https://github.com/anthropics/hh-rlhf",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
            license="MIT",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        subset = self.builder_config.subset
        local_dir = self._local_dir or _nonempty_manual_dir(dl_manager)
        if local_dir is not None:
            paths = _find_local_files(local_dir, subset)
        else:
            template = _URL_TEMPLATES[subset]
            urls = {split: template.format(subset=subset, split=split) for split in SPLITS}
            paths = dl_manager.download(urls)
        return {
            split: self._generate_examples(pathlib.Path(path), split)
            for split, path in paths.items()
        }

    def _generate_examples(self, path: pathlib.Path, split: str):
        _reject_lfs_pointer(path)
        subset = self.builder_config.subset
        summary = ReadSummary()
        records = read_jsonl_records(
            path,
            lambda record: comparison_from_hh_record(record, subset=subset),
            skip_invalid=self._skip_invalid,
            summary=summary,
        )
        for line, comparison in records:
            yield (
                line,
                {
                    "context": [{"role": m.role, "content": m.content} for m in comparison.context],
                    "chosen": comparison.chosen,
                    "rejected": comparison.rejected,
                    "is_safety_prompt": comparison.is_safety_prompt,
                    "level": comparison.level.label,
                    "line": line,
                },
            )
        skipped = dict(self.info.metadata.get("skipped", {}))
        skipped[split] = dict(summary.skipped)
        self.info.metadata["skipped"] = skipped


def _nonempty_manual_dir(dl_manager: tfds.download.DownloadManager) -> pathlib.Path | None:
    try:
        return pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # tfds raises it when the manual directory is missing or empty.
        return None


def _find_local_files(local_dir: pathlib.Path, subset: str) -> dict[str, pathlib.Path]:
    found = {}
    for split in SPLITS:
        candidates = [local_dir / subset / f"{split}.jsonl{suffix}" for suffix in (".gz", "")]
        existing = [path for path in candidates if path.is_file()]
        if existing:
            found[split] = existing[0]
        else:
            log.warning("Local HH-RLHF copy has no %s split: none of %s exists", split, candidates)
    if not found:
        raise FileNotFoundError(
            f"local HH-RLHF copy {local_dir} has no {subset} files; expected "
            f"{local_dir / subset}/train.jsonl.gz and/or test.jsonl.gz"
        )
    return found


def _reject_lfs_pointer(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        start = f.read(len(_LFS_POINTER_START))
    if start == _LFS_POINTER_START:
        raise ValueError(
            f"{path} is a Git LFS pointer, not the data; download the file through the Git LFS "
            "media endpoint or `git lfs pull` in a clone of the repository"
        )


def load_hh_rlhf(
    subset: str,
    split: str,
    data_dir: str | os.PathLike,
    local_dir: str | os.PathLike | None = None,
    *,
    skip_invalid: bool = False,
) -> list[Comparison]:
    """Prepare (once) and read one HH-RLHF subset and split as comparisons, in file order.

    Args:
        subset: One of "harmless-base", "helpful-base", "helpful-online",
            "helpful-rejection-sampled".
        split: "train" or "test".
        data_dir: The tensorflow-datasets data directory for the prepared files.
        local_dir: Optional local copy of the repository's subset folders; without it the
            files are downloaded.
        skip_invalid: Skip malformed pairs while preparing instead of failing. This takes
            effect only when the dataset is prepared, not when it already exists in
            `data_dir`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    builder = HhRlhf(
        config=config_name(subset),
        data_dir=str(pathlib.Path(data_dir).expanduser()),
        local_dir=local_dir,
        skip_invalid=skip_invalid,
    )
    # try_download_gcs=False: tfds would otherwise ask Google Cloud Storage for a prepared copy.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    if split not in builder.info.splits:
        raise ValueError(
            f"the prepared {subset} dataset in {builder.data_dir} has no {split!r} split "
            f"(it has {sorted(builder.info.splits)})"
        )
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in range(len(source))]
    examples.sort(key=lambda example: int(example["line"]))
    return [_comparison_from_example(example, subset) for example in examples]


def _comparison_from_example(example: dict, subset: str) -> Comparison:
    context = example["context"]
    messages = tuple(
        Message(role.decode("utf-8"), content.decode("utf-8"))
        for role, content in zip(context["role"], context["content"], strict=True)
    )
    return Comparison(
        context=messages,
        chosen=example["chosen"].decode("utf-8"),
        rejected=example["rejected"].decode("utf-8"),
        level=PreferenceLevel(int(example["level"])),
        is_safety_prompt=bool(example["is_safety_prompt"]),
        source=f"hh-rlhf/{subset}",
    )
