"""Loading files without running code from them, and the one opt-in that allows it.

What the library reads is data: safetensors, ``torch.load(weights_only=True)``, JSON, ONNX
graphs (run by ONNX Runtime, which executes no Python). Two formats are more than data:

* TorchScript (``torch.jit.load``) is a program: code plus pickles. It is refused unless the
  caller opts in with ``trust_code`` (``deit train``: ``distill.trust_code=true``; ``deit
  eval``: ``--trust-code``), and the opt-in is logged.
* A ``torch.export`` archive (``.pt2``) is a graph of ATen operators and raw tensor bytes,
  which is safe, but the format may also carry things ``torch.export.load`` executes:
  pickled tensors and objects (``use_pickle`` entries, loaded with ``weights_only=False``),
  pickled example inputs (``weights_only=False`` as a fallback), compiled AOTInductor
  libraries, and strings it hands to ``eval``/``exec`` (sympy expressions, guard code, names
  pasted into the generated FX code). :func:`check_pt2` reads the archive (a zip) before
  PyTorch does and refuses every one of those, so a ``.pt2`` that passes loads as data;
  ``trust_code`` turns the refusal into a logged warning.

References:
    torch ``export/pt2_archive/_package.py`` (``load_pt2``: the archive layout and the
    ``use_pickle`` flag), ``_export/serde/serialize.py`` (``deserialize_torch_artifact``,
    ``_parse_sym_expr``), ``export/_unlift.py`` (``_convert_guards_code_to_fn``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import pickletools
import re
import zipfile
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deit.errors import CheckpointError, ResourceLimitError, UnsafeFileError

log = logging.getLogger(__name__)

OPT_IN = (
    "if you trust its author, opt in with trust_code=True "
    "(deit train: distill.trust_code=true; deit eval: --trust-code)"
)

# Entries of a torch.export archive (paths inside its one top-level folder), per
# torch/export/pt2_archive/constants.py.
_PT2_MARKERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".format_version",
        ".storage_alignment",
    }
)
# Folders and name endings of the records torch.export.load reads (or skips on purpose).
_PT2_FOLDERS = (
    "models/",
    "data/weights/",
    "data/constants/",
    "data/sample_inputs/",
    "data/aotinductor/",
    "data/executorch/",
    "data/mtia",
    "extra/",
    ".data/",
    "xl_model_weights/",
)
_PAYLOAD_FOLDERS = ("data/weights/", "data/constants/")  # raw tensors, described by configs
_PT2_SUFFIXES = ("_config.json", ".json", ".pt")
_MAX_JSON_BYTES = 256 << 20  # a model.json of a huge graph is a few MB
_MAX_EXPANSION = 16  # declared contents / bytes on disk (PyTorch stores entries uncompressed)
_PICKLE_SCAN_BYTES = 64 << 20
# Strings in models/*.json that PyTorch never turns into code (free text, JSON of pytree specs,
# constants it repr()s); every other string must be a plain (dotted) name.
_FREE_TEXT_KEYS = frozenset(
    {
        "stack_trace",
        "nn_module_stack",
        "source_fn_stack",
        "torch_fn",
        "custom",
        "in_spec",
        "out_spec",
        "as_string",
        "as_strings",
    }
)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.+\-]*")  # + and - for versions ("2.14.1+cu130")
_KEY_NAME = re.compile(r"[A-Za-z0-9_.]*")
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")  # all but \t and \n


# --------------------------------------------------------------------------- pickles

_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
)
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"})


def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` globals a pickle (or several in a row) imports, found by reading
    its opcodes with :mod:`pickletools`; nothing is unpickled. ``?`` where a name can't be told.
    """
    found: list[str] = []
    stream = io.BytesIO(data[:_PICKLE_SCAN_BYTES])
    while stream.tell() < len(stream.getbuffer()):  # legacy torch files: pickles in a row
        memo: dict[int, Any] = {}
        pushed: list[Any] = [None, None]
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    module, attr = pushed[-2], pushed[-1]
                    ok = isinstance(module, str) and isinstance(attr, str)
                    found.append(f"{module}.{attr}" if ok else "?")
                if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg or 0)] = pushed[-1]
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1]
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg or 0)))
                elif name in _STRING_OPS:
                    pushed.append(arg)
                elif name not in _NO_PUSH_OPS:
                    pushed.append(None)
                del pushed[:-2]
        except Exception:  # raw tensor bytes after the pickles, or not a pickle at all
            break
    return found


@lru_cache(maxsize=1)
def _weights_only_globals() -> frozenset[str]:
    """What ``torch.load(weights_only=True)`` accepts, as ``module.name`` strings."""
    allowed: set[str] = set()
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed |= set(_get_allowed_globals())
    except (ImportError, AttributeError):  # a private helper: degrade to the public list
        pass
    for obj in torch.serialization.get_safe_globals():
        obj = obj[0] if isinstance(obj, tuple) else obj
        allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}")
    return frozenset(allowed)


def unsafe_globals(data: bytes, also_allowed: Iterable[str] = ()) -> list[str]:
    """Globals of a pickle that the weights-only unpickler would refuse (they could run code)."""
    allowed = _weights_only_globals() | set(also_allowed)
    return [g for g in dict.fromkeys(pickle_globals(data)) if g not in allowed]


def torch_file_pickles(path: str | Path) -> Iterator[bytes]:
    """The pickles of a ``torch.save``/``torch.jit.save`` file: each ``.pkl`` entry of its zip,
    or the file's first bytes for the legacy (non-zip) format."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith(".pkl") and info.file_size <= _PICKLE_SCAN_BYTES:
                    yield z.read(info)
        return
    with path.open("rb") as f:
        yield f.read(_PICKLE_SCAN_BYTES)


# --------------------------------------------------------------------------- torch.export


def _refuse(path: Path, why: str) -> None:
    raise UnsafeFileError(f"{path} {why}, which could run code; refused")


def _check_expansion(z: zipfile.ZipFile, what: str, stored_bytes: int) -> None:
    """Refuse a zip whose entries decompress to far more than it holds (a zip bomb: PyTorch
    would allocate every declared byte). PyTorch writes its archives uncompressed."""
    declared = sum(info.file_size for info in z.infolist())
    if declared > _MAX_EXPANSION * stored_bytes + (64 << 20):
        raise ResourceLimitError(
            f"{what} declares {declared:,} bytes of contents in {stored_bytes:,} bytes "
            "(a zip bomb?); refused"
        )


def _archive_entries(z: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """Entries by their name inside the archive's one top-level folder.

    PyTorch's zip reader (miniz) finds a record by its name *ignoring case*, and which of two
    such entries it returns depends on where they sit in the archive. So the names checked
    here must be the names PyTorch reads: two entries equal under case folding are refused,
    and so is an entry whose name matches a record PyTorch reads only once case is ignored
    (``data/weights/model_weights_config.JSON``).
    """
    _check_expansion(z, str(path), path.stat().st_size)
    entries: dict[str, zipfile.ZipInfo] = {}
    folded: dict[str, str] = {}
    roots = set()
    for info in z.infolist():
        root, _, name = info.filename.partition("/")
        roots.add(root)
        if name in entries:  # readers disagree on which copy wins: never guess
            raise UnsafeFileError(f"{path} holds entry {name!r} twice; refused")
        if name.casefold() in folded:
            raise UnsafeFileError(
                f"{path} holds entries {folded[name.casefold()]!r} and {name!r}, one record to "
                "PyTorch (it ignores case); refused"
            )
        _check_record_case(name, path)
        entries[name] = info
        folded[name.casefold()] = name
    if len(roots) != 1:
        raise CheckpointError(
            f"{path} is not a torch.export archive (entries in {len(roots)} folders)"
        )
    return entries


def _check_record_case(name: str, path: Path) -> None:
    """Refuse a name that is one of PyTorch's records (or in one of its folders, or of one of
    its kinds) only when case is ignored: PyTorch would read it, the check would not."""
    folded = name.casefold()
    for known in (*_PT2_MARKERS, *_PT2_FOLDERS):
        if folded.startswith(known) and not name.startswith(known):
            break
    else:
        suffixes = [s for s in _PT2_SUFFIXES if folded.endswith(s) and not name.endswith(s)]
        if not suffixes:
            return
        known = suffixes[0]
    raise UnsafeFileError(
        f"{path} holds entry {name!r}, which differs from PyTorch's {known!r} only in case "
        "(PyTorch would read it as one of its records); refused"
    )


def _json_entry(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Any:
    if info.file_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {info.filename} is {info.file_size:,} bytes; refused")
    try:
        return json.loads(z.read(info))
    except (ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: {info.filename} is not valid JSON ({e})") from e


@lru_cache(maxsize=1)
def _sympy_names() -> frozenset[str]:
    """Callables a sympy expression in a .pt2 may name: sympy classes, torch's sympy
    functions (what ``srepr`` prints). Every one of them only builds an expression."""
    import sympy
    import torch.utils._sympy.functions as functions
    import torch.utils._sympy.numbers as numbers

    names = {
        name
        for module in (sympy, functions, numbers)
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, sympy.Basic) and not name.startswith("_")
    }
    return frozenset(names | {"oo", "zoo", "nan", "pi", "E", "I", "true", "false", "int_oo"})


_SYMBOL = re.compile(r"[a-z]+_?\d+")  # s0, u1, zf2, r0_3: torch's symbol names


def _check_sym_expr(expr: str) -> str | None:
    """Why ``expr`` is not a plain sympy expression (what ``sympify`` would ``eval``), or None."""
    if len(expr) > 100_000:
        return "too long"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return "not an expression"
    allowed_nodes = (
        ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.Tuple,
        ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop,
        ast.boolop,
    )  # fmt: skip
    for node in ast.walk(tree):
        if not isinstance(node, allowed_nodes):
            return f"{type(node).__name__} node"
        if isinstance(node, ast.Name) and not (
            node.id in _sympy_names() or _SYMBOL.fullmatch(node.id)
        ):
            return f"name {node.id!r}"
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return "call of an expression"
        if isinstance(node, ast.keyword) and (node.arg is None or node.arg.startswith("_")):
            return "keyword argument"
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            text = node.value if isinstance(node.value, str) else ""
            if not (text.isidentifier() and "__" not in text) and not _NUMBER_TEXT.fullmatch(text):
                return f"string {node.value!r}"
    return None


def _check_graph_json(obj: Any, path: Path, entry: str, key: str = "") -> None:
    """Refuse strings of a serialized graph that PyTorch would paste into code it runs."""
    where = f"{path}: {entry}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str) or not _KEY_NAME.fullmatch(k):
                raise UnsafeFileError(f"{where} has a key {str(k)[:60]!r} that is not a name")
            if k == "guards_code" and v:
                raise UnsafeFileError(
                    f"{where} carries guard code (Python source PyTorch runs on load); refused"
                )
            if k == "metadata" and isinstance(v, dict):  # free text per node: never code
                for mk, mv in v.items():
                    if not isinstance(mv, str) or _CONTROL.search(mk + mv):
                        raise UnsafeFileError(f"{where}: node metadata {mk!r} is malformed")
                continue
            _check_graph_json(v, path, entry, k)
    elif isinstance(obj, list):
        for v in obj:
            _check_graph_json(v, path, entry, key)
    elif isinstance(obj, str):
        if key == "expr_str":
            why = _check_sym_expr(obj)
            if why:
                raise UnsafeFileError(
                    f"{where} holds a symbolic expression that is not plain sympy ({why}: "
                    f"{obj[:60]!r}), which PyTorch would eval; refused"
                )
        elif key in _FREE_TEXT_KEYS:
            if _CONTROL.search(obj):
                raise UnsafeFileError(f"{where}: {key} holds control characters; refused")
        elif not _PLAIN_NAME.fullmatch(obj):
            raise UnsafeFileError(
                f"{where}: {key} {obj[:60]!r} is not a plain name (PyTorch pastes it into "
                "generated code); refused"
            )


def _check_sample_inputs(data: bytes, path: Path, name: str) -> None:
    """Example inputs: torch tries weights_only=True, then falls back to a full unpickle."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            _check_expansion(inner, f"{path}: {name}", len(data))
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        found = unsafe_globals(data) or ["?"]
        _refuse(path, f"holds pickled example inputs ({name}: GLOBAL {found[0]})")


def check_pt2(path: str | Path) -> None:
    """Refuse a ``torch.export`` archive that ``torch.export.load`` would run code from.

    Reads only the zip's directory, its JSON entries and its (weights-only) example inputs.
    Names are compared as PyTorch finds them (ignoring case, see :func:`_archive_entries`).
    Every JSON file in the weights and constants folders is checked as a payload config,
    whatever its name, and every other file there must be raw tensor bytes that a checked
    config describes: nothing in the archive is left that a config could have PyTorch unpickle.

    Raises:
        UnsafeFileError: pickled weights, constants or objects, compiled AOTInductor code,
            guard code, strings that would be evaluated, entries whose names differ from
            PyTorch's records only in case, or payload files no config describes.
        ResourceLimitError: entries that decompress to far more than the file holds.
        CheckpointError: not a torch.export archive.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"torch.export file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch.export file (not a zip archive)")
    with zipfile.ZipFile(path) as z:
        entries = _archive_entries(z, path)
        marker = entries.get("archive_format")
        if marker is None or z.read(marker).strip() != b"pt2":
            raise CheckpointError(
                f"{path} is not a torch.export archive of this PyTorch (no archive_format pt2): "
                "re-export it with torch.export.save"
            )
        if not any(n.startswith("models/") for n in entries):
            raise CheckpointError(f"{path} holds no exported program (models/*.json)")
        payloads: dict[str, zipfile.ZipInfo] = {}
        described: set[str] = set()
        for name, info in entries.items():
            if name.startswith(_PAYLOAD_FOLDERS):
                if name.endswith(".json"):  # any config PyTorch could read, whatever its name
                    described |= _check_payload_config(_json_entry(z, info, path), path, name)
                elif name.endswith(".pt"):  # the legacy format: one pickle of all weights
                    _refuse(path, f"holds pickled legacy weights ({name})")
                else:
                    payloads[name] = info
            else:
                _check_other_entry(z, name, info, path)
        for name in payloads:
            if name.casefold() not in described:
                _refuse(path, f"holds {name!r}, which no payload config reads as tensor bytes")


def _check_other_entry(z: zipfile.ZipFile, name: str, info: zipfile.ZipInfo, path: Path) -> None:
    """An entry outside the payload folders: the graph, example inputs, markers, extras."""
    if name in _PT2_MARKERS or name.startswith((".data/", "extra/")):
        return
    if name.startswith("models/"):
        if not name.endswith(".json"):
            raise UnsafeFileError(f"{path}: unexpected entry {name!r}; refused")
        _check_graph_json(_json_entry(z, info, path), path, name)
    elif name.startswith("data/aotinductor/"):
        _refuse(path, f"holds compiled AOTInductor code ({name})")
    elif name.startswith("data/sample_inputs/"):
        if info.file_size > _PICKLE_SCAN_BYTES:
            raise CheckpointError(f"{path}: {name} is {info.file_size:,} bytes; refused")
        _check_sample_inputs(z.read(info), path, name)
    elif not name.startswith(("data/executorch/", "data/mtia", "xl_model_weights/")):
        # e.g. the pre-2.8 layout, whose state dict is one pickle (the skipped folders are
        # never read by torch.export.load)
        _refuse(path, f"holds entry {name!r}, which is not read as data")


def _check_payload_config(cfg: Any, path: Path, name: str) -> set[str]:
    """A JSON file of ``data/{weights,constants}/``: every entry must be raw tensor bytes.

    Returns:
        The entries it describes, as case-folded names inside the archive's folder (how
        PyTorch finds them).
    """
    payloads = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(payloads, dict):
        raise CheckpointError(f"{path}: {name} is not a payload config")
    is_constant = name.startswith("data/constants/")
    folder = _PAYLOAD_FOLDERS[1] if is_constant else _PAYLOAD_FOLDERS[0]  # PyTorch joins these
    described: set[str] = set()
    for fqn, meta in payloads.items():
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: {name} entry {fqn!r} is malformed")
        file = str(meta.get("path_name", ""))
        if meta.get("use_pickle") is not False or (is_constant and not file.startswith("tensor_")):
            _refuse(path, f"holds a pickled entry ({name}: {fqn!r} -> {file}, use_pickle)")
        if not _KEY_NAME.fullmatch(str(fqn)) or not _KEY_NAME.fullmatch(file):
            raise UnsafeFileError(f"{path}: {name} names {str(fqn)[:60]!r}, not a plain name")
        described.add(f"{folder}{file}".casefold())
    return described


def load_exported_program(
    path: str | Path, *, trust_code: bool = False, hint: str = OPT_IN
) -> torch.export.ExportedProgram:
    """``torch.export.load`` after :func:`check_pt2`.

    Args:
        path: the ``.pt2`` file.
        trust_code: load a file that fails the check anyway (logged as a warning).
        hint: appended to the refusal: how the caller can opt in ("" where it can't).

    Raises:
        UnsafeFileError: see :func:`check_pt2` (without ``trust_code``).
        CheckpointError: not a torch.export file, or one this PyTorch can't read.
    """
    path = Path(path)
    try:
        check_pt2(path)
    except UnsafeFileError as e:
        if not trust_code:
            raise UnsafeFileError(f"{e}: {hint}" if hint else str(e)) from None
        log.warning("%s; loaded anyway: trust_code is set", str(e).removesuffix("; refused"))
    with _torch_export_log() as logged:
        try:
            return torch.export.load(str(path))
        except Exception as e:  # torch raises RuntimeError, AssertionError, ValueError, ...
            cause = next((r.exc_info[1] for r in logged if r.exc_info and r.exc_info[1]), e)
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise CheckpointError(f"cannot load torch.export file {path}: {first[:200]}") from e


class _Hold(logging.Filter):
    """A logger filter that keeps the records it sees instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def _torch_export_log() -> Iterator[list[logging.LogRecord]]:
    """Hold what ``torch.export`` logs while it loads a file: on a failure it logs the whole
    traceback as a warning, then raises "check the warnings above". The caller turns the
    held error into its one-line message; only this logger, only for this call."""
    logger, hold = logging.getLogger("torch.export"), _Hold()
    logger.addFilter(hold)
    try:
        yield hold.records
    finally:
        logger.removeFilter(hold)


def load_exported_module(
    path: str | Path, *, trust_code: bool = False, hint: str = OPT_IN
) -> nn.Module:
    """The callable module of a checked ``.pt2`` file (arguments as
    :func:`load_exported_program`).

    Built with ``check_guards=False``: PyTorch's guard module is Python source generated from
    the file's contents; the input checks that matter (shapes, ranges) still run, as a hook.
    """
    program = load_exported_program(path, trust_code=trust_code, hint=hint)
    return program.module(check_guards=False)


# --------------------------------------------------------------------------- TorchScript


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (a zip with a ``code/`` folder)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.partition("/")[2].startswith("code/") for n in z.namelist())


def load_torchscript(
    path: str | Path, *, trust_code: bool = False, map_location: str = "cpu"
) -> torch.jit.ScriptModule:
    """``torch.jit.load``, only with ``trust_code`` (logged): a TorchScript file is a program.

    Raises:
        UnsafeFileError: ``trust_code`` is False.
    """
    path = Path(path)
    if not trust_code:
        raise UnsafeFileError(
            f"{path} is a TorchScript program, which runs code when loaded; refused: {OPT_IN}"
        )
    log.warning("loading TorchScript %s: trust_code is set, so its code will run", path)
    return torch.jit.load(str(path), map_location=map_location)
