"""The wire-level caffemodel walker: literal bytes, protobuf agreement, byte identity, fuzzing."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import subprocess
import sys

import caffe_proto as cp
import numpy as np
import pytest
from conftest import NANO, REPO, SAMPLE
from test_prototxt import BN

import bnfix
from bnfix import caffemodel
from bnfix.errors import BnfixError

MODELS = [SAMPLE / "yoloface-50k", NANO / "MobileNetV2-YOLOv3-Nano-voc"]


def entries(data: bytes, number: int = 100) -> list[bytes]:
    """The raw bytes (key, length, payload) of a NetParameter's top-level fields ``number``."""
    return [data[sp.start:sp.end] for sp in caffemodel.fields(data, 0, len(data)) if sp.number == number]


# -- a tiny model, byte for byte -----------------------------------------------------------------

TINY = bytes.fromhex(
    "a206"  # field 100 (layer), length-delimited
    "27"  # 39 bytes
    "0a026262"  # name: "bb"
    "120942617463684e6f726d"  # type: "BatchNorm"
    "3a06" "2a04" "0000803f"  # blobs { data: 1.0 }   (mean)
    "3a06" "2a04" "0000803e"  # blobs { data: 0.25 }  (variance)
    "3a06" "2a04" "0000803f"  # blobs { data: 1.0 }   (scale factor)
)


def _digest(*parts: bytes) -> str:
    """The marker digest, as its spec says: blake2b-48 over each part, each after its length."""
    h = hashlib.blake2b(digest_size=6)
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def test_tiny_model_patches_to_literal_bytes(tmp_path):
    (tmp_path / "t.prototxt").write_text(BN.format(body="").replace('"bn"', '"bb"'))
    (tmp_path / "t.caffemodel").write_bytes(TINY)
    result = bnfix.patch(tmp_path / "t.prototxt", tmp_path / "t.caffemodel")
    result.save(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    # var' = (sqrt(0.25) + 1e-6)^2 - float32(1e-6) = 0.250000000001 -> float32 0.25 (0x3e800000),
    # so the layer's bytes do not change at all (bnfix leaves its stored parameters alone). The
    # file gains bnfix's record at its end: NetParameter field 536870911 (key fa ff ff ff 0f), a
    # message of the layer name (field 1) and the marker text (field 2), whose digests are of
    # the three blobs' value bytes after and before (identical here: 0.25 stays 0.25).
    one, quarter = bytes.fromhex("0000803f"), bytes.fromhex("0000803e")
    stats = _digest(one, quarter, one)
    text = f"# bnfix: eps fit to sqrt(var) + 1e-06, eps 1e-06, stats {stats} from {stats} [undo]".encode()
    record = bytes.fromhex("0a026262") + bytes([0x12, len(text)]) + text
    expected = TINY + bytes.fromhex("faffffff0f") + bytes([len(record)]) + record
    assert (tmp_path / "o.caffemodel").read_bytes() == expected
    assert cp.parse(expected).layer[0].blobs[1].data[0] == 0.25
    assert f"stats {stats} from {stats}" in (tmp_path / "o.prototxt").read_text()


def test_index_reads_name_type_and_ranges():
    with caffemodel.Model(NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel") as m:
        net = cp.parse((NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel").read_bytes())
        assert [(l.name, l.type) for l in m.layers] == [(l.name, l.type) for l in net.layer]
        assert sum(l.type == "BatchNorm" for l in m.layers) == 57
        assert m.layers[-1].end == m.size
        up = next(l for l in m.layers if l.type == "Upsample")
        raw = (NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel").read_bytes()[up.payload:up.end]
        assert 149 in {sp.number for sp in caffemodel.fields(raw, 0, len(raw))}  # the fork's field



@pytest.mark.parametrize("whole", [False, True], ids=["window", "whole"])
@pytest.mark.parametrize("shift", range(0, 24, 3))
def test_index_is_exact_wherever_a_layer_header_meets_a_read_block(shift, whole, tmp_path, monkeypatch):
    """A large model is indexed through a 4 KiB block (not an mmap), a small one read whole;
    keys, lengths, names and types that straddle a block edge must read exactly as protobuf
    reads them either way."""
    monkeypatch.setattr(caffemodel, "WHOLE_MAX", 1 << 30 if whole else 0)
    net = cp.NetParameter()
    for i in range(12):
        layer = net.layer.add(name=f"layer-{i}-" + "n" * (i * 37 % 300), type="Convolution" if i % 2 else "BatchNorm")
        layer.blobs.add().data.extend([0.5] * (1000 + 7 * i + shift))  # ~4 KiB: edges move each layer
    data = net.SerializeToString()
    (tmp_path / "m.caffemodel").write_bytes(data)
    with caffemodel.Model(tmp_path / "m.caffemodel") as m:
        assert isinstance(m._map, bytes) is whole
        assert [(l.name, l.type) for l in m.layers] == [(l.name, l.type) for l in net.layer]
        assert [data[l.start:l.end] for l in m.layers] == entries(data)
        assert [len(m.entry(l).blobs[0].values) for l in m.layers] == [1000 + 7 * i + shift for i in range(12)]


def test_a_model_truncated_after_indexing_is_an_error_not_a_crash(tmp_path):
    """Reads go through pread, so a file cut short under bnfix gives a clean error (an mmap
    would kill the process with SIGBUS)."""
    path = tmp_path / "m.caffemodel"
    path.write_bytes((NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel").read_bytes())
    with caffemodel.Model(path) as m:
        assert not isinstance(m._map, bytes)  # 3.1 MB: read on demand
        last_bn = [l for l in m.layers if l.type == "BatchNorm"][-1]
        os.truncate(path, last_bn.payload + 10)
        with pytest.raises(BnfixError, match=f"{path}: layer '{last_bn.name}': "):
            m.entry(last_bn)
        assert not m.unchanged()

# -- everything but BatchNorm is byte-identical ---------------------------------------------------

@pytest.mark.parametrize("stem", MODELS, ids=lambda p: p.name)
def test_untouched_layers_are_byte_identical(stem, tmp_path):
    src = stem.with_suffix(".caffemodel").read_bytes()
    bnfix.patch(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel")).save(
        tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    out = (tmp_path / "o.caffemodel").read_bytes()
    assert [x for n in (1, 3, 4) for x in entries(src, n)] == [x for n in (1, 3, 4) for x in entries(out, n)]
    a, b = entries(src), entries(out)
    assert len(a) == len(b)
    types = [l.type for l in cp.parse(src).layer]
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert changed and all(types[i] == "BatchNorm" for i in changed)
    # The patched layers decode with real protobuf and differ only in blob 1 and the param.
    pa, pb = cp.parse(src), cp.parse(out)
    for i in changed:
        la, lb = pa.layer[i], pb.layer[i]
        assert la.batch_norm_param == lb.batch_norm_param  # stored parameters: left alone
        assert list(la.blobs[0].data) == list(lb.blobs[0].data)
        assert list(la.blobs[2].data) == list(lb.blobs[2].data)
        for x in (la, lb):
            x.blobs[1].ClearField("data")
            x.ClearField("batch_norm_param")
            x.DiscardUnknownFields()  # bnfix's record
        assert la == lb


def test_storage_forms_are_kept(tmp_path):
    """Legacy num/channels/height/width, double_data, unpacked floats, 5 NVCaffe blobs."""
    var = [0.5, 1e-3, 2.0]
    legacy = cp.bn_layer("legacy", [0, 0, 0], var, legacy=True)
    double = cp.bn_layer("double", [0, 0, 0], var, double=True)
    nv = cp.bn_layer("nvcaffe", [0, 0, 0], var, extra_blobs=([1, 1, 1], [0, 0, 0]))
    data = cp.model_bytes(legacy, double, nv)
    # Hand-encode the unpacked layer: each float as its own field-5 entry (wire type 5).
    blobs = b"".join(
        caffemodel.key(7, 2) + caffemodel.encode_varint(len(body)) + body
        for body in (b"".join(caffemodel.key(5, 5) + np.float32(v).tobytes() for v in vals)
                     for vals in ([0, 0, 0], var, [1.0]))
    )
    payload = b"\x0a\x08unpacked\x12\x09BatchNorm" + blobs
    data += caffemodel.key(100, 2) + caffemodel.encode_varint(len(payload)) + payload
    names = ["legacy", "double", "nvcaffe", "unpacked"]
    (tmp_path / "m.prototxt").write_text("".join(BN.format(body="").replace('"bn"', f'"{n}"') for n in names))
    (tmp_path / "m.caffemodel").write_bytes(data)
    result = bnfix.patch(tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    assert [l.status for l in result.layers] == ["patched"] * 4
    assert max(l.err_after for l in result.layers) <= 1e-7
    result.save(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    out = cp.parse((tmp_path / "o.caffemodel").read_bytes())
    assert out.layer[0].blobs[1].channels == 3 and not out.layer[0].blobs[1].HasField("shape")
    assert len(out.layer[1].blobs[1].double_data) == 3 and not out.layer[1].blobs[1].data
    assert len(out.layer[2].blobs) == 5 and list(out.layer[2].blobs[3].data) == [1, 1, 1]
    expected = (np.sqrt(np.array(var, np.float32).astype(np.float64)) + 1e-6) ** 2 - np.float32(1e-6)
    for layer in out.layer:
        got = np.array(layer.blobs[1].double_data or layer.blobs[1].data, np.float64)
        assert np.allclose(got, expected, rtol=1e-7)
    raw = (tmp_path / "o.caffemodel").read_bytes()
    last = caffemodel.payload_of(entries(raw)[-1])
    blobs = [sp for sp in caffemodel.fields(last, 0, len(last)) if sp.number == 7]
    unpacked = [f for b in blobs for f in caffemodel.fields(last, b.value, b.end) if (f.number, f.wire) == (5, 5)]
    assert len(unpacked) == 7  # still unpacked: 3 + 3 + 1 values


def test_nvcaffe_old_layout_is_skipped(tmp_path):
    old = cp.LayerParameter(name="bn", type="BatchNorm")  # NVCaffe 0.14: scale, bias, mean, var, reserved
    for values in ([1, 1], [0, 0], [0.1, 0.2], [0.5, 0.5], [0]):
        old.blobs.append(cp.blob(values))
    (tmp_path / "m.prototxt").write_text(BN.format(body=""))
    (tmp_path / "m.caffemodel").write_bytes(cp.model_bytes(old))
    result = bnfix.patch(tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    assert result.layers[0].status == "skipped" and "NVCaffe 0.14/0.15" in result.layers[0].reason
    assert not result.changed


def test_blob_count_must_match_shape():
    layer = cp.bn_layer("bn", [1, 2], [1, 2])
    layer.blobs[1].shape.dim[0] = 3
    data = entries(cp.model_bytes(layer))[0]
    payload = caffemodel.payload_of(data)
    with pytest.raises(caffemodel.WireError, match="blob 1 holds 2 values but its shape \\[3\\] needs 3"):
        caffemodel.decode_entry(caffemodel.Layer(0, 0, 0, len(data), "bn", "BatchNorm"), payload)


# -- bad bytes: only the module's error, never a crash --------------------------------------------

@pytest.mark.parametrize("cut", [1, 2, 3, 10, 100, 1000, 20000, 54232])
def test_truncated_files_raise_bnfix_error(cut, tmp_path):
    data = (SAMPLE / "yoloface-50k.caffemodel").read_bytes()[:cut]
    (tmp_path / "t.caffemodel").write_bytes(data)
    with pytest.raises(BnfixError, match=r"t\.caffemodel: not a valid caffemodel"):
        caffemodel.Model(tmp_path / "t.caffemodel").close()


def test_fuzzed_bytes_raise_only_bnfix_error(tmp_path):
    """Random byte changes anywhere: either a valid model (decoded) or a BnfixError."""
    rng = random.Random(7)
    good = bytearray((SAMPLE / "yoloface-50k.caffemodel").read_bytes())
    path = tmp_path / "f.caffemodel"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            with caffemodel.Model(path) as m:
                for layer in m.layers:
                    if layer.type == "BatchNorm":
                        m.entry(layer)
            outcomes["ok"] += 1
        except BnfixError:
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]  # both kinds of input were exercised


def test_text_file_hints_at_swapped_arguments(tmp_path):
    p = tmp_path / "x.caffemodel"
    p.write_text('name: "net"\nlayer { name: "a" }\n')
    with pytest.raises(BnfixError, match="are the arguments swapped"):
        caffemodel.Model(p)


def test_only_v1_layers(tmp_path):
    p = tmp_path / "v1.caffemodel"
    p.write_bytes(caffemodel.key(2, 2) + b"\x02\x0a\x00")
    with pytest.raises(BnfixError, match="only V1 'layers' entries"):
        caffemodel.Model(p)


# -- copying without Python objects, and its fallbacks --------------------------------------------

def test_copy_fallbacks_give_identical_output(tmp_path, monkeypatch):
    """copy_file_range; sendfile where it refuses; plain chunks where both do: the same bytes."""
    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"
    bnfix.patch(pp, mp).save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    expected = (tmp_path / "a.caffemodel").read_bytes()
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise OSError(errno.ENOSYS, "not supported")

    def save(name: str) -> bytes:
        bnfix.patch(pp, mp).save(tmp_path / f"{name}.prototxt", tmp_path / f"{name}.caffemodel")
        return (tmp_path / f"{name}.caffemodel").read_bytes()

    real_sendfile, sent = os.sendfile, []
    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", lambda *a: sent.append(a) or real_sendfile(*a))
    assert save("b") == expected and calls and sent  # sendfile
    monkeypatch.delattr(os, "copy_file_range")
    monkeypatch.setattr(os, "sendfile", refuse)
    assert save("c") == expected  # chunks


def test_a_real_write_error_is_not_taken_for_a_missing_syscall(tmp_path, monkeypatch):
    """ENOSPC from copy_file_range is a failure to report, not a reason to try sendfile."""
    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(BnfixError, match="No space left on device"):
        bnfix.patch(pp, mp).save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_preallocated_output_is_the_same_bytes(tmp_path, monkeypatch):
    """Large outputs get their blocks reserved first (fallocate); the bytes do not change, and
    a file system without fallocate only means no preallocation."""
    from bnfix import copier

    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"
    bnfix.patch(pp, mp).save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    expected = (tmp_path / "a.caffemodel").read_bytes()
    monkeypatch.setattr(copier, "PREALLOCATE_MIN", 0)
    sizes = []
    real = copier._fallocate()
    if sys.platform.startswith("linux"):
        assert real is not None

    def spy(fd: int, mode: int, offset: int, length: int) -> int:
        sizes.append((mode, offset, length))
        return real(fd, mode, offset, length) if real is not None else 0

    monkeypatch.setattr(copier, "_fallocate", lambda: spy)
    bnfix.patch(pp, mp).save(tmp_path / "b.prototxt", tmp_path / "b.caffemodel")
    assert (tmp_path / "b.caffemodel").read_bytes() == expected
    assert sizes == [(0, 0, len(expected))]

    def unsupported(*a: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(copier, "_fallocate", lambda: unsupported)
    bnfix.patch(pp, mp).save(tmp_path / "c.prototxt", tmp_path / "c.caffemodel")
    assert (tmp_path / "c.caffemodel").read_bytes() == expected


def test_a_full_disk_is_found_before_the_copy(tmp_path, monkeypatch):
    from bnfix import copier

    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"

    def full(*a: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    def no_copy(*a, **k):
        raise AssertionError("copied after fallocate failed")

    monkeypatch.setattr(copier, "PREALLOCATE_MIN", 0)
    monkeypatch.setattr(copier, "_fallocate", lambda: full)
    monkeypatch.setattr(os, "copy_file_range", no_copy)
    with pytest.raises(BnfixError, match="No space left on device"):
        bnfix.patch(pp, mp).save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_input_that_shrinks_during_the_copy_is_named(tmp_path, monkeypatch):
    """The copy reaching the input's end early means another program cut the file: the error
    names it, and nothing is written."""
    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"
    result = bnfix.patch(pp, mp)
    result.apply()  # everything read from the model before the copy

    def refuse(*a, **k):
        raise OSError(errno.ENOSYS, "not supported")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", refuse)
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: b"")
    with pytest.raises(BnfixError) as info:
        result.save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    assert str(info.value) == (f"{mp}: the file changed while bnfix was running (the input ended "
                               f"{mp.stat().st_size} bytes early while copying)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_statistics_are_refused_before_anything_is_written(tmp_path):
    layer = cp.bn_layer("bn", [0.0, 0.0], [1.0, float("nan")])
    (tmp_path / "m.prototxt").write_text(BN.format(body=""))
    (tmp_path / "m.caffemodel").write_bytes(cp.model_bytes(cp.conv_layer("c", np.zeros(1000)), layer))
    with pytest.raises(BnfixError, match="channel 1: variance is nan"):
        bnfix.patch(tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.caffemodel", "m.prototxt"]


def test_pure_python_protobuf_backend_gives_identical_output(tmp_path):
    """Only BatchNorm layers are decoded, so the slow backend changes nothing but speed."""
    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    for name, extra in (("py", env), ("upb", None)):
        subprocess.run([sys.executable, "-m", "bnfix", str(pp), str(mp), "-o", str(tmp_path / name), "-q"],
                       check=True, env=extra, cwd=REPO)
    for f in ("yoloface-50k.prototxt", "yoloface-50k.caffemodel"):
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "upb" / f).read_bytes()
