"""Streaming access to NPZ members: read and write whole arrays one block of rows at a time.

``np.load`` cannot memory-map the members of an NPZ file, so reading one pattern means decompressing (or
copying) the whole member. Here a member is read as consecutive blocks along the first axis of its
storage order:

- a *stored* member (``np.savez``) is read by byte offset: its array data starts at a fixed position in the
  file, so a block is one ``readinto`` into a preallocated buffer, and any rows, in any order, can be
  read directly (:meth:`NpzReader.read_rows`);
- a *deflated* member (``np.savez_compressed``) is read through :mod:`zipfile`'s incremental decompressor,
  block after block, so only one block is ever decompressed at a time.

Array data is never unpickled: members with an object dtype are listed but cannot be read.
The writer is the mirror image: :meth:`NpzWriter.stream` appends blocks to one member without holding it.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from ptychozarr.errors import InvalidParameterError, InvalidScanError

__all__ = ["NpzMember", "NpzReader", "NpzWriter"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, skipped fields, file name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_IOV_MAX = 1024  # buffers per preadv call (POSIX IOV_MAX on Linux)
_DEFLATE_RATIO = 1032  # deflate's largest expansion: a member holds at most this × its compressed size
_READ_BLOCK = 64 * 2**20  # bytes per block of a whole-member read (allocated as the data arrives)
_HEADER_READERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}


@dataclass(frozen=True)
class NpzMember:
    """One ``.npy`` member of an NPZ file, described from its header without reading its data.

    Attributes
    ----------
    name : str
        Key, without the ``.npy`` suffix.
    shape, dtype, fortran_order
        As in the ``.npy`` header.
    compressed : bool
        True unless the member is stored uncompressed.
    header_bytes : int
        Length of the ``.npy`` header inside the member.
    data_offset : int
        Absolute file offset of the array data (meaningful for stored members only).
    zinfo : zipfile.ZipInfo
        The zip entry.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    compressed: bool
    header_bytes: int
    data_offset: int
    zinfo: zipfile.ZipInfo

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """Shape of the data in the order it is stored (reversed for Fortran order)."""
        return self.shape[::-1] if self.fortran_order else self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class NpzReader:
    """Read the members of an NPZ file block by block.

    Parameters
    ----------
    path : str or Path
        The NPZ file.

    Raises
    ------
    InvalidScanError
        If the file is not a zip archive, is truncated, or a member's header is malformed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            mode = os.stat(self.path).st_mode  # never opens a FIFO or a device (an open could block)
        except OSError as exc:
            raise InvalidScanError(f"{self.path}: cannot open the input file ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            raise InvalidScanError(
                f"{self.path}: not a regular file (a directory, FIFO or device); give an NPZ file"
            )
        try:
            self._fh = open(self.path, "rb")  # closed by close()
        except OSError as exc:
            raise InvalidScanError(f"{self.path}: cannot open the input file ({exc.strerror})") from None
        try:
            self._file_size = self._fh.seek(0, 2)
            self._fh.seek(0)
            self._zip = zipfile.ZipFile(self._fh)
            self.members = {m.name: m for m in map(self._describe, self._zip.infolist()) if m is not None}
        except InvalidScanError:
            self.close()
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError, ValueError) as exc:
            self.close()
            if "CRC" in str(exc):
                raise InvalidScanError(
                    f"{self.path}: the file is damaged ({exc}: its bytes do not match the CRC-32 recorded "
                    "in the zip); re-create it"
                ) from None
            raise InvalidScanError(
                f"{self.path}: not a readable NPZ (zip) file, or truncated or damaged "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "re-create it with numpy.savez or numpy.savez_compressed"
            ) from None

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        if hasattr(self, "_zip"):
            self._zip.close()
        self._fh.close()

    def _describe(self, zinfo: zipfile.ZipInfo) -> NpzMember | None:
        if not zinfo.filename.endswith(".npy"):
            return None
        name = zinfo.filename[: -len(".npy")]
        if zinfo.header_offset + zinfo.compress_size > self._file_size:
            raise InvalidScanError(
                f"key {name!r}: the zip directory places {zinfo.compress_size} bytes at offset "
                f"{zinfo.header_offset}, past the end of the {self._file_size}-byte file (truncated or "
                "damaged); re-create it"
            )
        compressed = zinfo.compress_type != zipfile.ZIP_STORED
        limit = zinfo.compress_size * _DEFLATE_RATIO + 1024 if compressed else zinfo.compress_size
        if zinfo.file_size > limit:
            raise InvalidScanError(
                f"key {name!r}: the zip directory announces {zinfo.file_size} bytes in {zinfo.compress_size} "
                "stored bytes, more than they can hold (the file is damaged); re-create it"
            )
        with self._zip.open(zinfo) as fp:
            version = npformat.read_magic(fp)
            if version not in _HEADER_READERS:
                raise InvalidScanError(f"key {name!r}: unsupported .npy format version {version}")
            shape, fortran_order, dtype = _HEADER_READERS[version](fp)
            header_bytes = fp.tell()
        member = NpzMember(name, shape, dtype, fortran_order, compressed, header_bytes, 0, zinfo)
        if dtype.hasobject:
            return member
        if zinfo.file_size != header_bytes + member.nbytes:
            raise InvalidScanError(
                f"key {name!r}: member holds {zinfo.file_size - header_bytes} data bytes but its header "
                f"announces shape {shape} of {dtype} ({member.nbytes} bytes); the file is damaged, "
                "re-create it"
            )
        if compressed:
            return member
        self._fh.seek(zinfo.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(self._fh.read(_LOCAL_HEADER.size))
        if signature != _LOCAL_SIGNATURE:
            raise zipfile.BadZipFile(f"bad local header for member {zinfo.filename}")
        start = zinfo.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + zinfo.file_size > self._file_size:
            raise InvalidScanError(
                f"key {name!r}: the file ends inside this member (truncated); re-create it"
            )
        return NpzMember(name, shape, dtype, fortran_order, False, header_bytes, start + header_bytes, zinfo)

    def member(self, name: str) -> NpzMember:
        """The member ``name``, checked to be readable array data."""
        member = self.members[name]
        if member.dtype.hasobject:
            raise InvalidScanError(
                f"key {name!r} holds Python objects (pickled data), which are never loaded; "
                "save it as a numeric array"
            )
        return member

    def read(self, name: str) -> np.ndarray:
        """Read a whole member (for the small ones: coordinates, probe, object).

        The member is read in blocks of at most 64 MiB, so memory follows the data actually in the file,
        never a size its header announces; a stored member's CRC-32 is checked.
        """
        member = self.member(name)
        flat = (math.prod(member.shape),)
        rows = max(1, _READ_BLOCK // max(1, member.dtype.itemsize))
        blocks = list(self.iter_blocks(name, rows, flat, check_crc=True))
        if len(blocks) == 1:
            data = blocks[0]
        else:
            data = np.concatenate(blocks) if blocks else np.empty(flat, member.dtype)
        data = data.reshape(member.storage_shape)
        return data.T if member.fortran_order else data

    def digest(self) -> str:
        """Hex SHA-256 of the whole file, read once; on the way, the CRC-32 of every stored member is
        checked (a deflated member's is checked by :mod:`zipfile` as it streams).

        Raises
        ------
        InvalidScanError
            A stored member whose bytes do not match its CRC-32 (the file is damaged).
        """
        spans = sorted(
            (m.data_offset - m.header_bytes, m.data_offset - m.header_bytes + m.zinfo.file_size, m.name)
            for m in self.members.values()
            if not m.compressed and m.data_offset
        )
        crcs = dict.fromkeys((name for *_, name in spans), 0)
        digest = hashlib.sha256()
        buffer = bytearray(2**22)
        view = memoryview(buffer)
        with open(self.path, "rb") as fh:
            position = 0
            while got := fh.readinto(buffer):
                block = view[:got]
                digest.update(block)
                end = position + got
                for start, stop, name in spans:
                    if start < end and stop > position:
                        part = block[max(start, position) - position : min(stop, end) - position]
                        crcs[name] = zlib.crc32(part, crcs[name])
                position = end
        for name, crc in crcs.items():
            self._check_crc(self.members[name], crc)
        return digest.hexdigest()

    def _check_crc(self, member: NpzMember, crc: int) -> None:
        if crc != member.zinfo.CRC:
            raise InvalidScanError(
                f"key {member.name!r}: the member's bytes do not match its CRC-32 (the file is damaged); "
                "re-create it"
            )

    def iter_blocks(
        self, name: str, rows: int, shape: tuple[int, ...] | None = None, *, check_crc: bool = False
    ) -> Iterator[np.ndarray]:
        """Yield consecutive blocks of ``rows`` rows along the first axis of the storage order.

        Parameters
        ----------
        name : str
            The member.
        rows : int
            Rows per block (the last block may be shorter).
        shape : tuple of int, optional
            Read the data as a C-ordered array of this shape (same size): the storage shape by default,
            which is the member's shape reversed for a Fortran-ordered member.
        check_crc : bool
            Check a stored member's CRC-32 as the blocks stream (raised after the last block; zipfile
            checks a deflated member's itself).
        """
        member = self.member(name)
        shape = tuple(shape or member.storage_shape or (1,))
        if math.prod(shape) != math.prod(member.shape):
            raise InvalidParameterError(f"key {name!r}: cannot read shape {member.shape} as {shape}")
        stream = self._zip.open(member.zinfo) if member.compressed else None
        offset = member.data_offset
        crc = None
        try:
            if stream is not None:
                stream.read(member.header_bytes)
            elif check_crc:
                header = bytearray(member.header_bytes)
                at = offset - member.header_bytes
                if self._pread([np.frombuffer(header, np.uint8)], at) != len(header):
                    raise EOFError("unexpected end of data")
                crc = zlib.crc32(header)
            for start in range(0, shape[0], rows):
                block = np.empty((min(rows, shape[0] - start), *shape[1:]), member.dtype)
                view = block.reshape(-1).view(np.uint8)
                filled = stream.readinto(view) if stream is not None else self._pread([view], offset)
                if filled != block.nbytes:
                    raise EOFError("unexpected end of data")
                offset += block.nbytes
                if crc is not None:
                    crc = zlib.crc32(view, crc)
                yield block
            if crc is not None:
                self._check_crc(member, crc)
        except (EOFError, zipfile.BadZipFile, zlib.error, OSError) as exc:
            raise InvalidScanError(
                f"key {name!r}: cannot read the member's data ({exc}); the file is truncated or damaged"
            ) from None
        finally:
            if stream is not None:
                stream.close()

    def read_rows(self, name: str, rows: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Read rows ``rows`` (any order) along the first axis of the storage order of a stored member.

        Rows that follow each other in the file are read by one vectored ``preadv`` straight into their
        places in the result, so reading a permutation of the member costs about one system call per run
        of consecutive rows and no copy.

        Parameters
        ----------
        name : str
            The member; it must be stored (``np.savez``), not deflated.
        rows : array of int
            Row indices; the result holds them in this order.
        shape : tuple of int, optional
            As in :meth:`iter_blocks`.
        """
        member = self.member(name)
        if member.compressed:
            raise InvalidParameterError(
                f"key {name!r} is deflated: its rows can only be streamed in order (iter_blocks)"
            )
        shape = tuple(shape or member.storage_shape or (1,))
        if math.prod(shape) != math.prod(member.shape):
            raise InvalidParameterError(f"key {name!r}: cannot read shape {member.shape} as {shape}")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
            raise InvalidParameterError(f"key {name!r}: row indices must lie in [0, {shape[0]})")
        out = np.empty((len(rows), *shape[1:]), member.dtype)
        if not out.size:
            return out
        views = out.reshape(len(rows), -1).view(np.uint8)
        row_bytes = views.shape[1]
        by_row = np.argsort(rows, kind="stable")
        starts = np.flatnonzero(np.diff(rows[by_row], prepend=-2) != 1)
        for run in np.split(by_row, starts[1:]):
            for part in np.array_split(run, -(-len(run) // _IOV_MAX)):
                buffers = [views[i] for i in part]
                offset = member.data_offset + int(rows[part[0]]) * row_bytes
                if self._pread(buffers, offset) != len(part) * row_bytes:
                    raise InvalidScanError(f"key {name!r}: the file ends inside this member (truncated)")
        return out

    def _pread(self, buffers: list[np.ndarray], offset: int) -> int:
        """Fill ``buffers`` from consecutive file bytes at ``offset`` (independent of the file position)."""
        filled, pending = 0, [memoryview(b).cast("B") for b in buffers]
        while pending:
            got = os.preadv(self._fh.fileno(), pending, offset + filled)
            if not got:
                break
            filled += got
            while pending and got >= len(pending[0]):
                got -= len(pending.pop(0))
            if pending:
                pending[0] = pending[0][got:]
        return filled


class NpzWriter:
    """Write an NPZ file member by member, each member block by block.

    Parameters
    ----------
    path : str or Path
        The file to create.
    compress : bool
        Deflate the members (as ``np.savez_compressed``, at zlib's fastest level: reconstructions
        deflate to about 0.9 of their size at any level, level 1 in two thirds of the default's time)
        instead of storing them (as ``np.savez``).
    """

    def __init__(self, path: str | Path, compress: bool = False):
        mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        self._zip = zipfile.ZipFile(path, "w", compression=mode, compresslevel=1, allowZip64=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish the archive (writes the central directory)."""
        self._zip.close()

    def write(self, name: str, array: np.ndarray) -> None:
        """Write a whole array as member ``name``."""
        array = np.asarray(array)
        with self.stream(name, array.shape, array.dtype) as append:
            append(array)

    @contextmanager
    def stream(self, name: str, shape: tuple[int, ...], dtype) -> Iterator:
        """Open member ``name`` of ``shape`` and ``dtype`` (C order); yield a function appending blocks.

        Each block is a run of rows along the first axis. Leaving the context checks that exactly
        ``shape[0]`` rows were written.
        """
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise InvalidParameterError(f"key {name!r}: object arrays are not written")
        header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        written = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as fp:
            npformat.write_array_header_1_0(fp, header)

            def append(block: np.ndarray) -> None:
                nonlocal written
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.shape[1:] != tuple(shape[1:]) and shape:
                    raise InvalidParameterError(
                        f"key {name!r}: block of shape {block.shape} does not continue shape {shape}"
                    )
                written += block.shape[0] if shape else 1
                fp.write(block.reshape(-1).view(np.uint8))

            yield append
        expected = shape[0] if shape else 1
        if written != expected:
            raise InvalidParameterError(
                f"key {name!r}: wrote {written} rows, the header announced {expected}"
            )
