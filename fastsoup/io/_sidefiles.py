"""A soup written as its source's library writes it (STYLE.md 19): a soup of Hugging Face model
folders is a model folder (config, generation config, tokenizer, processors, a model card), a soup
of peft adapters an adapter folder, and every soup says what it is made of.

The *donor* is the folder the side files come from: the first ingredient's, or ``config_from``.
An ingredient has a folder of its own when it is a folder, or a file with a name transformers or
peft give the weights (``model.safetensors``, ``adapter_model.safetensors``, ``pytorch_model.bin``,
``adapter_model.bin``, a shard or an index of those): transformers reads exactly that file from its
folder, so the folder's config describes it. A file of any other name (``runs/ft-3.safetensors``)
has none: a config beside it may describe another checkpoint. ``config_from`` may name any file: its
folder is the donor (the user chose it).

Side files are read whole, once, before the merge (they are small; one larger than
``MAX_SIDE_FILE`` is refused), and written into the output folder before its atomic install
(``AtomicOutput(extras=...)``): they are in its manifest, so a later ``overwrite`` may replace them
and a file the user put in the folder still blocks it. What was read is what is written, even if
the donor's file changes meanwhile. No weights of other formats are copied.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import ArgumentError, CheckpointError

MAX_SIDE_FILE = 64 * 10**6  # bytes: a side file is read whole into memory
CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
MODEL_WEIGHTS = "model.safetensors"  # transformers' save_pretrained, one file
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's save_pretrained (never sharded)
# Copied from the donor when present (a top-level file of the folder; subfolders are not copied).
SIDE_FILES = (
    CONFIG_NAME, "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    ADAPTER_CONFIG_NAME, CARD_NAME,
)
_VOCAB = re.compile(r"^vocab[\w.-]*$")  # vocab.json, vocab.txt, ...
_NOT_SIDE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")
# The file names of weights that transformers and peft read from a folder.
_WEIGHT_FILE = re.compile(
    r"^(?:(?:model|adapter_model)(?:-\d{5}-of-\d{5})?\.safetensors|(?:pytorch_model|adapter_model)(?:-\d{5}-of-\d{5})?\.bin"
    r"|(?:model\.safetensors|pytorch_model\.bin|adapter_model\.safetensors)\.index\.json)$"
)
_LORA_KEY = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")
_FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
ADAPTER_NOTE = ("these are LoRA adapters: their factors A and B are averaged separately, which is not the average of "
                "the updates B·A (mean(B)·mean(A) != mean(B·A)); to average the updates, merge each adapter into the "
                "base model first (peft: merge_and_unload) and average the merged models")


class SoupNote(UserWarning):
    """A note about a soup that is not an error: mixed input dtypes, LoRA factors averaged separately
    (the CLI prints these as one line, ``fastsoup: note: ...``)."""


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def note(message: str) -> None:
    """Warns with a :class:`SoupNote`, attributed to the first caller outside fastsoup."""
    import sys

    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame = frame.f_back
        level += 1
    warnings.warn(message, SoupNote, stacklevel=level)


def is_path(src: Any) -> bool:
    return isinstance(src, (str, os.PathLike))


def source_folder(src: Any) -> str | None:
    """The model folder an ingredient comes from (see the module's docstring), or None."""
    if not is_path(src):
        return None
    path = os.fspath(src)
    if os.path.isdir(path):
        return path
    if _WEIGHT_FILE.match(os.path.basename(path)) and os.path.isfile(path):
        return os.path.dirname(path) or "."
    return None


def is_adapter_folder(folder: str) -> bool:
    """A peft adapter folder: ``adapter_config.json`` and the adapter's weights."""
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(folder, n)) for n in (ADAPTER_WEIGHTS, "adapter_model.bin"))


def has_lora_keys(names) -> bool:
    """Whether tensor names are those of LoRA factors (``...lora_A.weight``, ``...lora_B.weight``)."""
    return any(_LORA_KEY.search(n) for n in names)


@dataclass
class SoupInfo:
    """What a soup is made of: written into its safetensors ``__metadata__`` (``fastsoup.*`` keys,
    JSON-encoded strings) and its model card."""

    recipe: str  # "uniform_soup", "weighted_soup", "weighted_sum", "soup", "greedy_soup", "learned_soup", ...
    ingredients: list[str]
    weights: list[float] | dict[str, list[float | None]]  # K weights, or tensor name -> K weights (None: no weight)
    parameters: dict | None = None  # a merge method's parameters as given (fastsoup.merge), JSON-able

    def metadata(self) -> dict[str, str]:
        from .._version import __version__

        meta = {
            "fastsoup.recipe": self.recipe,
            "fastsoup.ingredients": json.dumps(self.ingredients),
            "fastsoup.weights": json.dumps(self.weights),
            "fastsoup.version": __version__,
        }
        if self.parameters is not None:
            meta["fastsoup.parameters"] = json.dumps(self.parameters)
        return meta


def ingredient_names(sources: Sequence[Any]) -> list[str]:
    """Paths as given; ``<ingredient i>`` for in-memory ingredients."""
    return [os.fspath(s) if is_path(s) else f"<ingredient {i}>" for i, s in enumerate(sources)]


def soup_metadata(donor_metadata: Mapping[str, str] | None, info: SoupInfo | None) -> dict[str, str]:
    """The output's ``__metadata__``: the layout ingredient's, ``format: pt`` (transformers refuses
    a file without it), and the provenance."""
    meta = dict(donor_metadata) if donor_metadata is not None else {}
    meta.setdefault("format", "pt")
    if info is not None:
        meta.update(info.metadata())
    return meta


@dataclass
class Donor:
    """The side files of a donor folder, as read (name -> bytes)."""

    folder: str
    files: dict[str, bytes] = field(default_factory=dict)
    adapter: bool = False  # a peft adapter folder: the soup is one adapter_model.safetensors
    card_is_ours: bool = False  # its README.md is a card fastsoup wrote (a soup of soups): write a new one

    @property
    def weights_name(self) -> str:
        return ADAPTER_WEIGHTS if self.adapter else MODEL_WEIGHTS

    def render(self, *, dtype: str | None, info: SoupInfo | None) -> dict[str, bytes]:
        """The files to write beside the soup's weights: the side files (``config.json`` with its
        dtype set to ``dtype``), and a model card unless the donor has one."""
        out = {}
        for name, data in self.files.items():
            if name == CONFIG_NAME and dtype is not None:
                data = set_config_dtype(data, dtype, os.path.join(self.folder, name))
            if name == CARD_NAME and self.card_is_ours:
                continue
            out[name] = data
        if CARD_NAME not in out:
            out[CARD_NAME] = model_card(info, dtype=dtype, files=self.files, adapter=self.adapter)
        return out


def donor_for(out: Any, config_from: Any, default: Any) -> Donor | None:
    """The donor of an output: None for a file output (one file: no side files), or when
    ``config_from`` is False; else ``config_from``'s folder, or ``default``'s (the first ingredient)."""
    from .writer import is_file_output

    if out is None or is_file_output(out) or config_from is False:
        return None
    if config_from is not None:
        return read_donor(config_from, explicit=True)
    return read_donor(default)


def read_donor(src: Any, *, explicit: bool = False) -> Donor | None:
    """Reads the side files of the folder ``src`` comes from (see the module's docstring).
    ``explicit`` (``config_from``): any file names its folder, and a missing one is an error.

    Raises:
        CheckpointError: ``config_from`` is missing, or a side file cannot be read or is too large.
    """
    if explicit:
        if not is_path(src):
            raise ArgumentError(f"config_from must be a path (a model folder or a file in one), got {type(src).__name__}")
        path = os.fspath(src)
        if not os.path.exists(path):
            raise CheckpointError(f"config_from {path}: no such file or folder")
        folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    else:
        folder = source_folder(src)
        if folder is None:
            return None
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot list the folder for its side files: {e.strerror or e}") from None
    files = {}
    for name in names:
        if (name in SIDE_FILES or _VOCAB.match(name)) and not name.endswith(_NOT_SIDE):
            data = _read_side_file(os.path.join(folder, name))
            if data is not None:
                files[name] = data
    card_is_ours = CARD_NAME in files and _written_by_fastsoup(folder, CARD_NAME, len(files[CARD_NAME]))
    return Donor(folder, files, is_adapter_folder(folder), card_is_ours)


def _read_side_file(path: str) -> bytes | None:
    """The whole file (following symlinks, as in a Hugging Face cache); None for what is not a
    regular file (a folder, a FIFO: never waited on)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read this side file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_size > MAX_SIDE_FILE:
        raise CheckpointError(_too_large(path, st.st_size))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read this side file: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_SIDE_FILE:
                raise CheckpointError(_too_large(path, total))
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read this side file: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _too_large(path: str, size: int) -> str:
    return (f"{path}: this side file has {size / 1e6:.0f} MB, more than the {MAX_SIDE_FILE // 10**6} MB fastsoup copies "
            "into a soup's folder (side files are read whole); pass config_from= a folder without it, or "
            "config_from=False to copy no side files")


def _written_by_fastsoup(folder: str, name: str, size: int) -> bool:
    from .writer import _manifest

    files = _manifest(folder)
    return files is not None and files.get(name) == size


def set_config_dtype(data: bytes, dtype: str, where: str = CONFIG_NAME) -> bytes:
    """``config.json`` with every ``dtype`` / ``torch_dtype`` entry that names a float dtype (the
    key transformers 5 writes, and 4.x's; nested configs too) set to ``dtype``; every other byte is
    kept (the values are replaced in the text, then the result is checked by parsing it; where that
    check fails, the config is dumped again with the donor's indentation). A config that is not a
    JSON object is copied as it is, with a warning."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        note(f"{where}: not valid JSON ({e}); copied as it is, its dtype not set")
        return data
    if not isinstance(obj, dict):
        return data
    want = _with_dtype(obj, dtype)
    if want == obj:
        return data
    text = data.decode("utf-8")
    pattern = r'("(?:torch_)?dtype"\s*:\s*)"(' + "|".join(_FLOAT_DTYPE_NAMES) + r')"'
    edited = re.sub(pattern, lambda m: f'{m.group(1)}"{dtype}"', text)
    try:
        if json.loads(edited) == want:
            return edited.encode("utf-8")
    except ValueError:
        pass
    m = re.search(r"\n([ \t]+)\S", text)
    indent = m.group(1) if m else None
    return (json.dumps(want, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def _with_dtype(obj: Any, dtype: str) -> Any:
    if isinstance(obj, dict):
        return {k: (dtype if k in ("dtype", "torch_dtype") and v in _FLOAT_DTYPE_NAMES else _with_dtype(v, dtype))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_with_dtype(v, dtype) for v in obj]
    return obj


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell in backticks."""
    return text.replace("`", "'").replace("|", "\\|").replace("\n", " ")


def model_card(info: SoupInfo | None, *, dtype: str | None, files: Mapping[str, bytes] = {},
               adapter: bool = False) -> bytes:
    """A short ``README.md``: the recipe, the ingredients and their weights, the dtype, fastsoup's version."""
    from .._version import __version__

    library = "peft" if adapter else ("transformers" if CONFIG_NAME in files else None)
    front = ["---"]
    if library:
        front.append(f"library_name: {library}")
    base = None
    if adapter:
        try:
            base = json.loads(files.get(ADAPTER_CONFIG_NAME, b"{}").decode("utf-8")).get("base_model_name_or_path")
        except (UnicodeDecodeError, ValueError, AttributeError):
            base = None
    if isinstance(base, str) and base:
        front.append(f"base_model: {json.dumps(base)}")
    front += ["tags:", "- fastsoup", "- model-soup", "- merge", "---", ""]
    recipe = info.recipe if info is not None else "soup"
    lines = [
        "# Model soup", "",
        f"A weight average of fine-tuned checkpoints (a *model soup*, Wortsman et al., ICML 2022), written by "
        f"fastsoup {__version__}.", "",
        f"- recipe: `{_md(recipe)}`",
    ]
    if dtype is not None:
        lines.append(f"- dtype: `{dtype}`")
    if adapter:
        lines.append("- LoRA adapters: the factors A and B were averaged separately, which is not the average of the "
                     "updates B·A.")
    if info is not None:
        lines += ["", "| ingredient | weight |", "|---|---:|"]
        if isinstance(info.weights, dict):
            weights = []
            for k in range(len(info.ingredients)):  # None: an ingredient without a weight (a sparse merge's base)
                col = [r[k] for r in info.weights.values() if r[k] is not None]
                weights.append(sum(col) / len(col) if col else (0.0 if not info.weights else None))
            note = "mean over tensors of the layer-wise weights"
        else:
            weights, note = list(info.weights), None
        for name, w in zip(info.ingredients, weights):
            lines.append(f"| `{_md(name)}` | {'–' if w is None else format(w, '.6g')} |")
        if note:
            lines += ["", f"Weights: {note}."]
    lines += ["", "The same record is in the safetensors metadata (`fastsoup.recipe`, `fastsoup.ingredients`, "
              "`fastsoup.weights`, `fastsoup.version`).", ""]
    return "\n".join(front + lines).encode("utf-8")


def shard_groups(ck, names: Sequence[str]) -> list[int] | None:
    """The shard number of every tensor of a checkpoint of several files, or None (one file). A
    folder of torch ``.bin`` shards reads them into memory: their shards come from the index."""
    files = list(ck.files)
    if len(files) <= 1:
        return None
    position = {f: i for i, f in enumerate(files)}
    refs = [ck[n] for n in names]
    if all(r.file is not None for r in refs):
        return [position.get(r.file, 0) for r in refs]
    index_path = _torch_index(ck.source)
    if index_path is None:
        return None
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    if not isinstance(weight_map, dict):
        return None
    folder = os.path.dirname(index_path) or "."
    groups = []
    for r in refs:
        if r.file is not None:
            groups.append(position.get(r.file, 0))
            continue
        shard = weight_map.get(r.name)
        g = position.get(os.path.join(folder, shard)) if isinstance(shard, str) else None
        if g is None:  # a name the index does not give as read (e.g. renamed on open): one shard
            return None
        groups.append(g)
    return groups


def _torch_index(source: str) -> str | None:
    if source.endswith(".index.json"):
        return source
    if os.path.isdir(source):
        found = [n for n in sorted(os.listdir(source)) if n.endswith(".bin.index.json")]
        if len(found) == 1:
            return os.path.join(source, found[0])
    return None


def mixed_dtypes_note(checkpoints: Sequence[Any], override: str | None) -> str | None:
    """A note when the ingredients' float tensors have different dtypes and no output dtype was
    given (each tensor then takes the first ingredient's dtype), else None."""
    if override is not None or len(checkpoints) < 2:
        return None
    from .._dtypes import info as dtype_info

    first = checkpoints[0]
    floats = [n for n, r in first.items() if dtype_info(r.dtype).kind == "float"]
    if not any(ck[n].dtype != first[n].dtype for ck in checkpoints[1:] for n in floats):
        return None  # the same dtype per tensor in every ingredient (some may mix, e.g. fp32 norms): as given
    by_kind: dict[str, list[str]] = {}  # "float16" or "float16+float32" -> the ingredients of that mix
    for ck in checkpoints:
        by_kind.setdefault("+".join(sorted({ck[n].dtype for n in floats})), []).append(ck.source)
    shown = "; ".join(f"{kind} in {', '.join(srcs[:2])}" + (f" and {len(srcs) - 2} more" if len(srcs) > 2 else "")
                      for kind, srcs in by_kind.items())
    return (f"the ingredients' float dtypes differ ({shown}): each tensor of the soup takes its dtype in the first "
            f"ingredient; pass dtype= (CLI: --dtype) to choose")
