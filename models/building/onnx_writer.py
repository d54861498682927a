"""Initializers written to the external data file as a graph is built, never all held in memory.

Large tensors start at page boundaries (4096 bytes): onnxruntime then maps them from the file instead of
copying them to its heap (its ModelSavingOptions describe the rule), so a device pays for a model's weights
once. A build's peak memory is one tensor's worth, not the model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

PAGE = 4096
ALIGN_ABOVE = 64 << 10  # tensors from this size start on a page; smaller ones on 64 bytes
INLINE_BELOW = 1024  # tensors smaller than this stay inside model.onnx


class ExternalData:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.written = 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A TensorProto for `array`: inline when tiny, else appended to the data file at an aligned offset."""
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar 1-D)
            array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(array, name)
        align = PAGE if array.nbytes >= ALIGN_ABOVE else 64
        offset = -(-self.written // align) * align
        if offset > self.written:
            self._file.write(b"\0" * (offset - self.written))
        self._file.write(memoryview(array).cast("B"))  # (tobytes() would copy a 170 MB table once more)
        self.written = offset + array.nbytes
        proto = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            proto.external_data.add(key=key, value=value)
        return proto

    def close(self) -> None:
        self._file.flush()
        self._file.close()
