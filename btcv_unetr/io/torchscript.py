"""TorchScript files read as data: the weights of a TorchScript archive, without running any of its code.

A TorchScript ``.pt`` (``torch.jit.save``) is a zip whose entries sit under one folder ``<name>/``:

    data.pkl            a pickle of the module tree: each module an object of a ``__torch__.*`` class whose state
                        is a dict of its attributes (submodules, tensors, ints, tuples ...); tensors point, by
                        persistent id, at the raw bytes of their storage in ``data/<key>``
    code/__torch__/...  the TorchScript source of each class; a module class's header declares which of its
                        attributes are parameters and buffers (``__parameters__ = ["weight", "bias", ]``)
    traced_inputs.pkl   the example inputs of a traced module (``torch.jit.trace`` since torch 2), records in
                        ``traced_inputs/<key>``; absent from scripted and older files
    extra/btcv_unetr_model.json
                        the model config ``btcv-unetr export`` records beside its trace (:data:`ARCHITECTURE_FILE`):
                        ModelConfig's keys (``model_name`` names the network) and the grid spacing it was built for

``torch.jit.load`` turns this into objects and runs their code: a module's own ``__setstate__`` runs at load. Here a
small pickle interpreter of our own rebuilds plain values (numbers, strings, tuples, lists, dicts) and tensors only;
every ``__torch__`` object stays a :class:`ScriptObject` record of its state; the source files are read as text,
to tell weights from other tensors, and never run. What cannot be read so is refused in one line.

    read_archive   path -> ScriptArchive: weights by state-dict key, plain attributes by path, the shapes of a traced
                   file's example inputs, the model config our export recorded

Any network's archive reads so; what an archive says about its network is read by ``btcv_unetr.model.torchscript``.
"""

from __future__ import annotations

import ast
import json
import math
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

# The tensor element types of TorchScript storages, by the name its pickler writes (``torch FloatStorage``).
STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
                  "ComplexDoubleStorage": torch.complex128}

# The model config (ModelConfig as a dict, JSON) that ``btcv-unetr export`` stores in a TorchScript file's extra/
# folder: the network's name and settings, which a traced module's weights and attributes do not show (a UNETR's
# heads and ROI shape, a CNN's everything).
ARCHITECTURE_FILE = "btcv_unetr_model.json"
# The key beside ModelConfig's in that file: the preprocessed grid's mm per voxel the network was built for
# (DynUNet's kernels and strides are planned from it).
RECORDED_SPACING = "spacing"


class Unreadable(Exception):
    """The archive is damaged or in a form this reader does not know (the reason)."""


class NeedsCode(Unreadable):
    """The archive holds something only running its code could rebuild (what)."""


# What damaged bytes raise in the interpreter below or in what reads its values (names that are not UTF-8, a list
# or an object where a dict key or a number belongs, sizes beyond any tensor): the file is damaged, whatever the type.
DAMAGE = (UnicodeDecodeError, TypeError, ValueError, OverflowError, KeyError, IndexError, struct.error)


@dataclass
class ScriptObject:
    """An object of a TorchScript class (``__torch__.monai.networks.nets.unetr.UNETR``), never instantiated:
    its qualified class name and the state its pickle gave (a dict of attributes for ordinary modules)."""

    qualified_name: str
    state: Any = None
    built: bool = False


@dataclass(frozen=True)
class _ScriptClass:
    qualified_name: str


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage's elements as a 1-D tensor of its dtype."""

    flat: torch.Tensor


@dataclass(frozen=True)
class _Function:
    """One of the few callables a pickle may call (REDUCE): our own functions, never the file's choice."""

    name: str
    call: Callable[..., Any]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """The tensor view ``(size, stride, offset)`` of a storage read from the archive, bounds checked."""
    if not isinstance(storage, _Storage):
        raise Unreadable("a tensor without a storage record")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))):
        raise Unreadable("a tensor with an invalid shape")
    if hooks:
        raise NeedsCode("a tensor with backward hooks")
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.flat.numel():
        raise Unreadable("a tensor larger than its storage record")
    if not math.prod(size):
        return torch.empty(size, dtype=storage.flat.dtype, device=storage.flat.device)
    return storage.flat.as_strided(size, stride, offset)


def _as_list(values: Any) -> list:
    if not isinstance(values, list):
        raise Unreadable("a typed list that is not a list")
    return values


def _ordered_dict(*args: Any) -> dict:
    return dict(*args)


def _untagged(value: Any, type_tag: Any) -> Any:
    """TorchScript tags generic lists and dicts with their type (``Dict[str, int]``): the value is what counts."""
    return value


ALLOWED_FUNCTIONS = {("torch._utils", "_rebuild_tensor_v2"): _Function("_rebuild_tensor_v2", _rebuild_tensor),
                     ("collections", "OrderedDict"): _Function("OrderedDict", _ordered_dict),
                     ("torch.jit._pickle", "restore_type_tag"): _Function("restore_type_tag", _untagged),
                     ("torch", "device"): _Function("device", str),
                     **{("torch.jit._pickle", f"build_{kind}list"): _Function(f"build_{kind}list", _as_list)
                        for kind in ("int", "double", "bool", "tensor")}}


def _resolve_global(module: str, name: str) -> Any:
    """What a GLOBAL opcode may name: TorchScript classes (kept as names), storage types, our functions."""
    if module == "__torch__" or module.startswith("__torch__."):
        return _ScriptClass(f"{module}.{name}")
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    if (module, name) in ALLOWED_FUNCTIONS:
        return ALLOWED_FUNCTIONS[(module, name)]
    raise NeedsCode(f"it needs {module}.{name}, which only running code could rebuild")


class _Unpickler:
    """A pickle interpreter for the opcodes TorchScript's pickler writes (protocol 2), nothing else.

    Globals resolve through :func:`_resolve_global`; NEWOBJ makes :class:`ScriptObject` records and BUILD only
    gives them their state; persistent ids go to ``persistent_load``. No opcode can call anything else.
    """

    def __init__(self, data: bytes, persistent_load: Callable[[Any], Any]):
        self.data, self.pos, self.persistent_load = data, 0, persistent_load
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def read(self, n: int) -> bytes:
        start = self.pos
        end = start + n
        if end > len(self.data):
            raise Unreadable("a pickle cut short")
        self.pos = end
        return self.data[start:end]

    def unpack(self, fmt: str) -> Any:
        layout = _LAYOUTS[fmt]
        return layout.unpack(self.read(layout.size))[0]

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise Unreadable("a pickle cut short")
        return self.read(end + 1 - self.pos)[:-1].decode("utf-8")

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise Unreadable("a damaged pickle (no mark)")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise Unreadable("a damaged pickle (empty stack)")
        return self.stack.pop()

    def load(self) -> Any:
        data = self.data
        while True:
            at = self.pos
            if at >= len(data):
                raise Unreadable("a pickle cut short")
            opcode = data[at:at + 1]
            self.pos = at + 1
            if opcode == b".":  # STOP
                return self.pop()
            handler = _OPCODES.get(opcode)
            if handler is None:
                raise Unreadable(f"pickle opcode {opcode!r}, which TorchScript does not write")
            try:
                handler(self)
            except DAMAGE as exc:  # damaged bytes: a name that is not UTF-8, a list as a dict key, a huge size
                raise Unreadable(f"a damaged pickle (opcode {opcode!r} at byte {at}: {exc.__class__.__name__})") \
                    from None

    # Values.
    def push(self, value: Any) -> None:
        self.stack.append(value)

    def mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def tuple_n(self, n: int) -> None:
        items = [self.pop() for _ in range(n)][::-1]
        self.push(tuple(items))

    def long1(self) -> None:
        self.push(int.from_bytes(self.read(self.unpack("<B")), "little", signed=True))

    def text(self, fmt: str) -> None:
        self.push(self.read(self.unpack(fmt)).decode("utf-8"))

    def append(self, items: list[Any]) -> None:
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, list):
            raise Unreadable("a damaged pickle (append to a non-list)")
        target.extend(items)

    def setitems(self, items: list[Any]) -> None:
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, dict) or len(items) % 2:
            raise Unreadable("a damaged pickle (set items of a non-dict)")
        for key, value in zip(items[::2], items[1::2]):
            target[key] = value

    # Objects.
    def global_(self) -> None:
        module = self.line()
        self.push(_resolve_global(module, self.line()))

    def reduce(self) -> None:
        args, function = self.pop(), self.pop()
        if not isinstance(function, _Function) or not isinstance(args, tuple):
            raise NeedsCode(f"a call of {getattr(function, 'qualified_name', type(function).__name__)}, which only "
                             "running code could do")
        try:
            self.push(function.call(*args))
        except (TypeError, ValueError) as exc:
            raise Unreadable(f"{function.name} with unexpected arguments ({exc})") from None

    def newobj(self) -> None:
        args, cls = self.pop(), self.pop()
        if not isinstance(cls, _ScriptClass) or args != ():
            raise NeedsCode("an object that is not a TorchScript class instance")
        self.push(ScriptObject(cls.qualified_name))

    def build(self) -> None:
        state = self.pop()
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, ScriptObject) or target.built:
            raise Unreadable("a damaged pickle (state for something that is not a TorchScript object)")
        target.state, target.built = state, True

    def memo_put(self, key: int) -> None:
        if not self.stack:
            raise Unreadable("a damaged pickle (empty stack)")
        self.memo[key] = self.stack[-1]

    def memo_get(self, key: int) -> None:
        if key not in self.memo:
            raise Unreadable("a damaged pickle (unknown memo entry)")
        self.push(self.memo[key])


# The binary layouts the opcodes below read, compiled once (the interpreter reads tens of thousands per file).
_LAYOUTS = {fmt: struct.Struct(fmt) for fmt in ("<B", "<H", "<I", "<i", "<Q", ">d")}

_OPCODES: dict[bytes, Callable[[_Unpickler], None]] = {
    b"\x80": lambda u: u.read(1),  # PROTO
    b"\x95": lambda u: u.read(8),  # FRAME (protocol 4): a length we need not know
    b"(": _Unpickler.mark,
    b")": lambda u: u.push(()),
    b"t": lambda u: u.push(tuple(u.pop_mark())),
    b"\x85": lambda u: u.tuple_n(1),
    b"\x86": lambda u: u.tuple_n(2),
    b"\x87": lambda u: u.tuple_n(3),
    b"]": lambda u: u.push([]),
    b"a": lambda u: u.append([u.pop()]),
    b"e": lambda u: u.append(u.pop_mark()),
    b"}": lambda u: u.push({}),
    b"s": lambda u: u.setitems([*reversed([u.pop(), u.pop()])]),
    b"u": lambda u: u.setitems(u.pop_mark()),
    b"N": lambda u: u.push(None),
    b"\x88": lambda u: u.push(True),
    b"\x89": lambda u: u.push(False),
    b"J": lambda u: u.push(u.unpack("<i")),
    b"K": lambda u: u.push(u.unpack("<B")),
    b"M": lambda u: u.push(u.unpack("<H")),
    b"\x8a": _Unpickler.long1,
    b"G": lambda u: u.push(u.unpack(">d")),
    b"X": lambda u: u.text("<I"),
    b"\x8c": lambda u: u.text("<B"),
    b"\x8d": lambda u: u.text("<Q"),
    b"B": lambda u: u.push(u.read(u.unpack("<I"))),
    b"C": lambda u: u.push(u.read(u.unpack("<B"))),
    b"c": _Unpickler.global_,
    b"R": _Unpickler.reduce,
    b"\x81": _Unpickler.newobj,
    b"b": _Unpickler.build,
    b"Q": lambda u: u.push(u.persistent_load(u.pop())),
    b"q": lambda u: u.memo_put(u.unpack("<B")),
    b"r": lambda u: u.memo_put(u.unpack("<I")),
    b"\x94": lambda u: u.memo_put(len(u.memo)),  # MEMOIZE
    b"h": lambda u: u.memo_get(u.unpack("<B")),
    b"j": lambda u: u.memo_get(u.unpack("<I")),
}


@dataclass(frozen=True)
class _ClassInfo:
    """What a TorchScript class's source header says: a module? its parameters and buffers; its own __setstate__?"""

    is_module: bool
    weights: frozenset[str] = frozenset()
    own_setstate: bool = False


@dataclass
class _Archive:
    """An open TorchScript zip: its folder prefix (``name/``) and the classes read from its source so far."""

    zip: zipfile.ZipFile
    prefix: str
    classes: dict[str, _ClassInfo] = field(default_factory=dict)

    def unpickle(self, name: str, records: str, shapes_only: bool = False) -> Any:
        """The value of ``<prefix><name>`` whose storages are in ``<prefix><records>/<key>``; ``shapes_only``: its
        tensors on the meta device, records not read (a traced file stores its example inputs' shapes only)."""
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
                raise NeedsCode(f"a persistent id that is not a tensor storage ({str(pid)[:60]})")
            _, storage_type, key, _location, numel = pid
            if numel < 0:
                raise Unreadable("a tensor storage of negative size")
            if shapes_only:
                return _Storage(torch.empty(numel, dtype=storage_type.dtype, device="meta"))
            if key not in storages:
                storages[key] = self.storage(f"{records}/{key}", storage_type.dtype, numel)
            return storages[key]

        return _Unpickler(self.read(name), persistent_load).load()

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            raise Unreadable(f"the archive has no {self.prefix}{name}") from None

    def storage(self, name: str, dtype: torch.dtype, numel: int) -> _Storage:
        """``numel`` elements of ``dtype`` from record ``name`` (stored in the file's byte order, checked little)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            size = self.zip.getinfo(self.prefix + name).file_size
        except KeyError:
            raise Unreadable(f"a tensor record {self.prefix}{name} that is missing") from None
        if size < nbytes:
            raise Unreadable(f"a tensor record {self.prefix}{name} shorter than its tensor")
        if not nbytes:
            return _Storage(torch.empty(0, dtype=dtype))
        with self.zip.open(self.prefix + name) as record:  # only the tensor's bytes, however long the record
            raw = bytearray(record.read(nbytes))
        return _Storage(torch.frombuffer(raw, dtype=dtype))

    def class_info(self, qualified_name: str) -> _ClassInfo:
        if qualified_name not in self.classes:
            self.classes[qualified_name] = self._read_class(qualified_name)
        return self.classes[qualified_name]

    def _read_class(self, qualified_name: str) -> _ClassInfo:
        """A class's header from ``code/<module path>.py``, read as text: ``class Linear(Module):`` then, indented
        by two spaces, ``__parameters__ = [...]``, ``__buffers__ = [...]`` and its methods."""
        module, _, name = qualified_name.rpartition(".")
        try:
            source = self.read(f"code/{module.replace('.', '/')}.py").decode("utf-8")
        except (Unreadable, UnicodeDecodeError):
            return _ClassInfo(is_module=False)
        header = re.search(rf"^class {re.escape(name)}\((\w+)\):\n((?:(?:  .*)?\n)*)", source, re.MULTILINE)
        if header is None:
            return _ClassInfo(is_module=False)
        body = header.group(2)
        declared = {}
        for kind in ("parameters", "buffers"):
            found = re.search(rf"^  __{kind}__ = (\[.*\])$", body, re.MULTILINE)
            if found is None:
                if header.group(1) == "Module":
                    raise Unreadable(f"class {qualified_name} does not declare its {kind}")
                declared[kind] = []
                continue
            try:
                declared[kind] = ast.literal_eval(found.group(1))  # a list of names: data, never evaluated as code
            except (ValueError, SyntaxError):
                raise Unreadable(f"class {qualified_name} declares its {kind} unreadably") from None
        names = [*declared["parameters"], *declared["buffers"]]
        if not all(isinstance(n, str) for n in names):
            raise Unreadable(f"class {qualified_name} declares its weights unreadably")
        return _ClassInfo(is_module=header.group(1) == "Module", weights=frozenset(names),
                          own_setstate=re.search(r"^  def __setstate__\(", body, re.MULTILINE) is not None)


def _plain(value: Any) -> bool:
    """Numbers, strings, None and tuples/lists of them: the attributes kept for reading the architecture."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass
class ScriptArchive:
    """What a TorchScript file holds, read without running it.

    weights: parameters and buffers by state-dict key (``vit.patch_embedding.position_embeddings``)
    attributes: plain attribute values by path (``vit.blocks.0.attn.num_heads`` -> 4; scripted files keep them,
        traced ones only their modules' weights)
    traced_inputs: shapes of the example inputs a traced file was recorded with, e.g. ``[(1, 1, 96, 96, 96)]``
    recorded: the model config our export stored (:data:`ARCHITECTURE_FILE`); {} in other files
    """

    weights: dict[str, torch.Tensor]
    attributes: dict[str, Any]
    traced_inputs: list[tuple[int, ...]]
    recorded: dict[str, Any] = field(default_factory=dict)


def _collect(archive: _Archive, module: ScriptObject, path: str, out: ScriptArchive) -> None:
    """The weights and plain attributes of ``module`` and its submodules into ``out``, keys prefixed by ``path``."""
    info = archive.class_info(module.qualified_name)
    where = f"module '{path.rstrip('.') or '(the root)'}' ({module.qualified_name.removeprefix('__torch__.')})"
    if info.own_setstate or not isinstance(module.state, dict):
        raise NeedsCode(f"{where} restores itself with its own code (__setstate__)")
    for name, value in module.state.items():
        if not isinstance(name, str):
            raise Unreadable(f"{where} has an attribute that is not named by a string")
        key = path + name
        if name in info.weights:
            if value is not None and not isinstance(value, torch.Tensor):
                raise Unreadable(f"{where} declares '{name}' a weight but stores no tensor in it")
            if value is not None:
                out.weights[key] = value
        elif isinstance(value, ScriptObject) and archive.class_info(value.qualified_name).is_module:
            _collect(archive, value, key + ".", out)
        elif _plain(value):
            out.attributes[key] = value


def _traced_input_shapes(archive: _Archive) -> list[tuple[int, ...]]:
    """Shapes of the tensors a traced file's ``forward`` was recorded with; [] for files that hold none."""
    if archive.prefix + "traced_inputs.pkl" not in archive.zip.namelist():
        return []
    recorded = archive.unpickle("traced_inputs.pkl", "traced_inputs", shapes_only=True)
    inputs = recorded.get("forward", []) if isinstance(recorded, dict) else []
    return [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)] if isinstance(inputs, (list, tuple)) else []


def _recorded_architecture(archive: _Archive) -> dict[str, Any]:
    """The model config our export stored in the file (JSON: data only), or {} for files without one."""
    if archive.prefix + "extra/" + ARCHITECTURE_FILE not in archive.zip.namelist():
        return {}
    try:
        recorded = json.loads(archive.read("extra/" + ARCHITECTURE_FILE))
    except ValueError:
        raise Unreadable(f"its extra/{ARCHITECTURE_FILE} is not JSON") from None
    if not isinstance(recorded, dict):
        raise Unreadable(f"its extra/{ARCHITECTURE_FILE} is not a model config")
    return recorded


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The folder (``name/``) of a TorchScript archive, or a one-line refusal naming what the file is instead."""
    names = zf.namelist()
    roots = {n.split("/", 1)[0] + "/" for n in names if n.count("/") == 1 and n.endswith("/data.pkl")}
    if len(roots) != 1:
        detail = ("written by PyTorch before 1.4, which this reader does not know: re-save it with a newer PyTorch"
                  if any(n.endswith("model.json") for n in names) else "no data.pkl in the archive")
        raise UserError(f"{path}: not a TorchScript file ({detail})")
    prefix = roots.pop()
    if not any(n.startswith(prefix + "code/") for n in names):
        raise UserError(f"{path}: not a TorchScript file (a PyTorch checkpoint: pass it without "
                        "--saved_checkpoint torchscript / --resume_jit)")
    return prefix


def read_archive(path: str | Path) -> ScriptArchive:
    """The weights, attributes and traced input shapes of a TorchScript file, none of its code run.

    Refused in one line: a missing file, a file that is not TorchScript, a damaged one, and one holding anything only
    code could rebuild (a module restored by its own ``__setstate__``, quantized or sparse tensors, objects of
    other classes).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a TorchScript file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(zf, _archive_prefix(zf, path))
            if archive.prefix + "byteorder" in zf.namelist() and archive.read("byteorder").strip() != b"little":
                raise Unreadable("its tensors are stored big-endian")
            root = archive.unpickle("data.pkl", "data")
            if not isinstance(root, ScriptObject):
                raise Unreadable("its data.pkl holds no module")
            content = ScriptArchive({}, {}, [])
            _collect(archive, root, "", content)
            content.traced_inputs = _traced_input_shapes(archive)
            content.recorded = _recorded_architecture(archive)
            return content
    except NeedsCode as exc:
        raise UserError(f"{path}: refused: this TorchScript file cannot be read without running its code ({exc}); "
                        "where you trust it, save its weights with torch.save(torch.jit.load(FILE).state_dict(), "
                        "'weights.pt') and use that file instead") from None
    except Unreadable as exc:
        raise UserError(f"{path}: not a readable TorchScript file ({exc}); use another copy") from None
    except RecursionError:
        raise UserError(f"{path}: not a readable TorchScript file (values nested too deeply)") from None
    except DAMAGE as exc:  # read from a damaged pickle's values: what a module holds is not what it should
        raise UserError(f"{path}: not a readable TorchScript file (damaged values: {exc.__class__.__name__}); use "
                        "another copy") from None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not a readable TorchScript file ({exc.__class__.__name__}: {first})") from None
