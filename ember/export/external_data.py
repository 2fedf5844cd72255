"""ONNX weights kept out of memory: one aligned ``<name>.data`` file per graph, read a tensor at a time.

A multi-GiB decoder cannot be one protobuf (2 GiB cap) and should not be held in memory more than
once while it compiles. Ember therefore keeps a large graph's ``ModelProto`` as *structure only*:
its big initializers are external references (``location``/``offset``/``length``) into a data file
beside the graph, and a pass that needs a weight reads that one tensor (``read_tensor``). Writing
(``write_model``) streams every tensor -- inline or external, wherever it lives now -- into a new
data file, one tensor at a time, then renames it into place, so a graph can be rewritten over the
file it reads from.

Offsets of tensors of ``ALIGN_BYTES`` or more are multiples of the page size: ONNX Runtime's CPU
provider then maps them from the file instead of copying them (``model_saving_options.h`` in ONNX
Runtime), so a session over a 4 GB graph does not allocate another 4 GB.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PAGE = 4096  # offset alignment (Linux allocation granularity; ORT maps aligned external data)
ALIGN_BYTES = 1 << 20  # tensors this big start on a page boundary
INLINE_BYTES = 1024  # tensors smaller than this stay inside the graph file


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external_info(t: TensorProto) -> tuple[str, int, int | None]:
    """``(location, offset, length)`` of an external tensor (length None: to the end of the file)."""
    info = {e.key: e.value for e in t.external_data}
    length = info.get("length")
    return info["location"], int(info.get("offset", 0)), int(length) if length is not None else None


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of the tensor's data, wherever it is stored."""
    if is_external(t):
        _, _, length = external_info(t)
        if length is not None:
            return length
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims, dtype=np.int64))
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def _extent(t: TensorProto, base_dir: str | os.PathLike | None) -> tuple[Path, int, int]:
    """The file, offset and byte count of external ``t``'s data, checked: the file is there and holds them."""
    if base_dir is None:
        raise ValueError(f"tensor {t.name!r} is stored in an external file; pass the folder it lies in")
    location, start, length = external_info(t)
    path = Path(base_dir) / location
    if not path.is_file():
        raise FileNotFoundError(f"external data {location!r} of tensor {t.name!r} is missing from {base_dir}")
    size = path.stat().st_size
    if length is None:
        length = max(size - start, 0)
    elif start + length > size:
        raise ValueError(f"external data {location!r} of tensor {t.name!r} is truncated "
                         f"({max(size - start, 0)} of {length} bytes at offset {start})")
    return path, start, length


def _read_bytes(t: TensorProto, base_dir: str | os.PathLike | None) -> bytes:
    path, start, length = _extent(t, base_dir)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def load_tensor(t: TensorProto, base_dir: str | os.PathLike | None) -> TensorProto:
    """An inline copy of ``t`` (``t`` itself when it is inline already; never modified)."""
    if not is_external(t):
        return t
    out = TensorProto()
    out.CopyFrom(t)
    return inline_tensor(out, base_dir)


def inline_tensor(t: TensorProto, base_dir: str | os.PathLike | None, data: bytes | None = None) -> TensorProto:
    """Bring external ``t``'s data into ``t`` itself, in place (one copy of the bytes, read from
    ``base_dir``, or ``data``: its bytes, read already by ``raw_bytes``); an inline ``t`` is left as it
    is. Returns ``t``."""
    if not is_external(t):
        return t
    if data is None:
        data = _read_bytes(t, base_dir)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.raw_data = data
    return t


# element types whose external bytes are the numpy array's bytes as they stand (little-endian hosts):
# read straight into the array (``read_tensor``), not through a TensorProto copy
_PLAIN_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
                          TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                          TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64})


def read_tensor(t: TensorProto, base_dir: str | os.PathLike | None) -> np.ndarray:
    """The tensor as a numpy array, read from its external file where it has one (a plain numeric
    tensor straight into the array: one copy of its bytes, where going through ``load_tensor`` makes
    three, 5 s of llama-1b's W8A8 quantization)."""
    if is_external(t) and t.data_type in _PLAIN_TYPES and sys.byteorder == "little":
        path, start, length = _extent(t, base_dir)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims, dtype=np.int64))
        if count * dtype.itemsize == length:
            return np.fromfile(path, dtype=dtype, count=count, offset=start).reshape(tuple(t.dims))
    return numpy_helper.to_array(load_tensor(t, base_dir))


def load_all(model: onnx.ModelProto, base_dir: str | os.PathLike | None) -> onnx.ModelProto:
    """Bring every external tensor of ``model`` into memory, in place (for passes that rewrite all
    weights, e.g. the FP16 and Q/DQ passes); returns ``model``."""
    for t in model.graph.initializer:
        inline_tensor(t, base_dir)
    return model


def raw_bytes(t: TensorProto, base_dir) -> bytes:
    """``t``'s data as little-endian bytes, read from ``base_dir`` where it is external."""
    if is_external(t):
        return _read_bytes(t, base_dir)
    if t.raw_data:
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()  # typed fields (float_data, ...): the same little-endian bytes


def write_model(model: onnx.ModelProto, path: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                external: bool = True) -> list[str]:
    """Save ``model`` to ``path``; with ``external``, every initializer of ``INLINE_BYTES`` or more goes to
    ``<name>.data`` (page-aligned where ``ALIGN_BYTES`` or more) and ``model`` is left referring to it,
    its data no longer in memory. Tensors are read from wherever they are now (``base_dir`` for external
    ones), so the data file may be the one being replaced; where they already lie in ``<name>.data`` as this
    would write them (``TensorFileWriter`` wrote them there), nothing is copied. Without ``external`` every tensor is brought
    inline and a stale ``<name>.data`` is removed. Returns the files written, relative to ``path``'s folder.
    """
    path = Path(path)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    if not external:
        load_all(model, base_dir)
        onnx.save_model(model, str(path))
        data_path.unlink(missing_ok=True)
        return [path.name]
    for t in model.graph.initializer:  # small tensors live in the graph, wherever they were
        if is_external(t) and tensor_nbytes(t) < INLINE_BYTES:
            inline_tensor(t, base_dir)
    if not _laid_out(model, data_path, base_dir):  # else its tensors are where this would write them
        tmp_data = path.parent / f".{data_name}.tmp-{os.getpid()}"
        try:
            with TensorFileWriter(tmp_data, location=data_name) as data:
                for t in _big_tensors(model.graph.initializer):
                    data.add(t, base_dir=base_dir)
            os.replace(tmp_data, data_path)
        finally:
            tmp_data.unlink(missing_ok=True)
    onnx.save_model(model, str(path))
    return [path.name, data_name]


class TensorFileWriter:
    """Writes tensors one after another into the data file ``data_path`` in ``write_model``'s layout
    (in order; those of ``ALIGN_BYTES`` or more at page offsets), pointing each at its bytes there
    (``location``: the file's name as the graph refers to it, by default ``data_path``'s name). A graph
    built a weight at a time (``export/fused_graph.FusedGraph``) writes each into the file as it is
    made, so the graph never holds the weights in memory; ``write_model`` on that graph, the file being
    its ``<name>.data``, then finds them in place and copies nothing. Use as a context manager."""

    def __init__(self, data_path: str | os.PathLike, location: str | None = None):
        self.path = Path(data_path)
        self.location = location or self.path.name
        self.end = 0  # bytes of the file so far
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def add(self, t: TensorProto, data: bytes | memoryview | None = None,
            base_dir: str | os.PathLike | None = None) -> None:
        """Append ``t``'s bytes -- ``data`` (its raw little-endian bytes), else read from wherever ``t``
        holds them (an external one from ``base_dir``, copied file to file) -- and point ``t`` at them."""
        offset = _aligned(self.end, len(data) if data is not None else tensor_nbytes(t))
        if data is not None:
            written = _write_all(self._fd, data, offset)
        elif is_external(t):
            written = _copy_external(t, base_dir, self._fd, offset)
        else:
            written = _write_all(self._fd, raw_bytes(t, base_dir), offset)
        _point_to(t, self.location, offset, written)
        self.end = offset + written

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, self.end)  # a trailing hole still counts
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _aligned(end: int, nbytes: int) -> int:
    """The offset of a tensor of ``nbytes`` written after ``end`` bytes (a hole up to the page
    boundary reads back as zeros)."""
    return end + (-end % PAGE) if nbytes >= ALIGN_BYTES else end


def _laid_out(model: onnx.ModelProto, data_path: Path, base_dir: str | os.PathLike | None) -> bool:
    """Whether every tensor ``write_model`` would write to ``data_path`` is already there, external at
    the offset it would get, and the file holds nothing else (``TensorFileWriter`` wrote it)."""
    if base_dir is None or not data_path.is_file() or Path(base_dir).resolve() != data_path.parent.resolve():
        return False
    end = 0
    for t in _big_tensors(model.graph.initializer):
        if not is_external(t):
            return False
        location, offset, length = external_info(t)
        if location != data_path.name or length is None or offset != _aligned(end, length):
            return False
        end = offset + length
    return data_path.stat().st_size == end


def _write_all(fd: int, data: bytes, offset: int) -> int:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def _copy_external(t: TensorProto, base_dir, fd: int, offset: int) -> int:
    """Copy external ``t``'s bytes into ``fd`` at ``offset`` file to file (``os.copy_file_range``: the
    kernel copies them, no buffer the size of the tensor is allocated here); bytes copied."""
    path, start, length = _extent(t, base_dir)
    with open(path, "rb") as src:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), fd, length - done, start + done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:  # a file system (or kernel) without it: copy through memory
            pass
        if done < length:
            src.seek(start + done)
            done += _write_all(fd, src.read(length - done), offset + done)
    return done


def _big_tensors(tensors: Iterable[TensorProto]) -> Iterable[TensorProto]:
    return (t for t in tensors if tensor_nbytes(t) >= INLINE_BYTES)


def _point_to(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
