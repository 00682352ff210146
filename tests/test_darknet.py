"""Tests for bnfix.darknet: header rules, cfg splitting, the shape walk, and byte-exact reading.

Tiny cfg/weights pairs are written by hand with distinct values per block, so that reading
any block from the wrong offset (a wrong order, a wrong weight count) shows up as a wrong value.
The real MobileNetV2-YOLOv3-Nano pair checks the whole thing against an actual Darknet file.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfix.darknet import (
    DarknetBN,
    WeightsHeader,
    parse_cfg,
    parse_weights_header,
    read_bn_layers,
    read_cfg,
    read_weights_header,
    seen_is_64bit,
)
from bnfix.errors import BnfixError

NANO = Path(__file__).parent / "data" / "mobilenetv2-yolov3-nano-voc"
NANO_CFG = NANO / "MobileNetV2-YOLOv3-Nano-voc.cfg"
NANO_WEIGHTS = NANO / "MobileNetV2-YOLOv3-Nano-voc.weights"
NANO_CAFFEMODEL = NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel"


# -- helpers ---------------------------------------------------------------------------------


def header_bytes(major: int, minor: int, revision: int, seen: int = 0, *, seen64: bool | None = None) -> bytes:
    if seen64 is None:
        seen64 = seen_is_64bit(major, minor)
    return struct.pack("<3i", major, minor, revision) + struct.pack("<Q" if seen64 else "<I", seen)


def run(n: int, start: float) -> bytes:
    """n consecutive distinct values starting at ``start``."""
    return np.arange(start, start + n, dtype="<f4").tobytes()


def write_pair(tmp_path: Path, cfg: str, body: bytes, version=(0, 2, 5), name="net") -> tuple[Path, Path]:
    cfg_path = tmp_path / f"{name}.cfg"
    weights_path = tmp_path / f"{name}.weights"
    cfg_path.write_text(cfg)
    weights_path.write_bytes(header_bytes(*version, seen=1234) + body)
    return cfg_path, weights_path


# -- header ----------------------------------------------------------------------------------


def test_header_0_1_0_has_32bit_seen(tmp_path):
    path = tmp_path / "old.weights"
    path.write_bytes(header_bytes(0, 1, 0, seen=7) + b"\xff" * 8)
    h = read_weights_header(path)
    assert (h.major, h.minor, h.revision, h.seen, h.header_size) == (0, 1, 0, 7, 16)
    assert h.writer == "pjreddie" and h.version == "0.1.0"


def test_header_0_2_0_pjreddie_has_64bit_seen(tmp_path):
    path = tmp_path / "pj.weights"
    path.write_bytes(header_bytes(0, 2, 0, seen=5_000_000_000))  # > 2**32: needs all 8 bytes
    h = read_weights_header(path)
    assert (h.seen, h.header_size) == (5_000_000_000, 20)
    assert h.writer == "pjreddie" and not h.transposed


def test_header_0_2_5_alexeyab(tmp_path):
    path = tmp_path / "ab.weights"
    path.write_bytes(header_bytes(0, 2, 5, seen=2**40 + 3))
    h = read_weights_header(path)
    assert (h.version, h.seen, h.header_size, h.writer) == ("0.2.5", 2**40 + 3, 20, "AlexeyAB/hank-ai")


@pytest.mark.parametrize(("major", "minor"), [(1000, 2), (0, 1000), (1001, 1001)])
def test_header_major_or_minor_1000_means_32bit_seen(major, minor):
    # pjreddie: 64-bit only if major*10+minor >= 2 AND major < 1000 AND minor < 1000.
    h = parse_weights_header(header_bytes(major, minor, 0, seen=99, seen64=False))
    assert h.header_size == 16 and h.seen == 99
    assert h.writer.startswith("unknown (")
    assert h.transposed == (major > 1000 or minor > 1000)


def test_header_unknown_writer_names_the_version():
    h = parse_weights_header(header_bytes(1, 0, 3, seen=1))
    assert h.header_size == 20 and h.writer == "unknown (1.0.3)"


@given(
    major=st.integers(-5, 2000),
    minor=st.integers(-5, 2000),
    revision=st.integers(-(2**31), 2**31 - 1),
    seen=st.integers(0, 2**32 - 1),
)
def test_header_roundtrip_follows_the_rule(major, minor, revision, seen):
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    h = parse_weights_header(header_bytes(major, minor, revision, seen) + b"tail")
    assert (h.major, h.minor, h.revision, h.seen) == (major, minor, revision, seen)
    assert h.header_size == (20 if wide else 16)


def test_header_too_short_is_truncated(tmp_path):
    path = tmp_path / "short.weights"
    path.write_bytes(struct.pack("<3i", 0, 2, 5) + b"\0\0")
    with pytest.raises(BnfixError, match=r"^short\.weights: truncated: .* needs 20 bytes, the file has 14$"):
        read_weights_header(path)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(BnfixError, match=r"^nothere\.weights: cannot read"):
        read_weights_header(tmp_path / "nothere.weights")


# -- cfg splitting ---------------------------------------------------------------------------


def test_parse_cfg_like_darknet():
    text = (
        "# comment\n"
        "; another\n"
        "[net]\r\n"
        "width = 416\n"
        "\n"
        "[ convolutional ]\n"
        "filters=255 # trailing comment\n"
        "filters=3\n"  # a duplicate: Darknet's option_find returns the first
        "this line has no equals sign\n"
        "mask = 3, 4, 5\n"
    )
    net, conv = parse_cfg(text, "x.cfg")
    assert (net.name, net.line, dict(net.options)) == ("net", 3, {"width": "416"})
    assert conv.name == "convolutional" and conv.line == 6
    assert dict(conv.options) == {"filters": "255", "mask": "3,4,5"}
    assert conv.option_lines["mask"] == 10


def test_parse_cfg_option_before_section():
    with pytest.raises(BnfixError, match=r"^x\.cfg: line 1: option 'width' before the first \[section\]$"):
        parse_cfg("width=3\n[net]\n", "x.cfg")


def test_read_cfg_of_the_real_model():
    sections = read_cfg(NANO_CFG)
    assert sections[0].name == "net" and sections[0].options["width"] == "320"
    assert len(sections) == 1 + 80  # Darknet numbers the 80 layers 0..79
    yolo = [s for s in sections if s.name == "yolo"]
    assert [s.options["mask"] for s in yolo] == ["3,4,5", "0,1,2"]


# -- the real pair ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nano() -> tuple[WeightsHeader, list[DarknetBN]]:
    return read_bn_layers(NANO_CFG, NANO_WEIGHTS)


def test_nano_header(nano):
    header, _ = nano
    assert (header.version, header.header_size, header.writer) == ("0.2.5", 20, "AlexeyAB/hank-ai")


def test_nano_bn_layers(nano):
    _, bns = nano
    assert len(bns) == 57
    assert sum(b.channels for b in bns) == 8960
    assert all(b.kind == "convolutional" for b in bns)
    assert all(len(b.scales) == len(b.mean) == len(b.variance) == len(b.biases) == b.channels for b in bns)
    assert all(b.variance.dtype == np.float32 for b in bns)
    # Darknet numbering: layer 9 is the first [shortcut], so it has no BN.
    assert [b.index for b in bns[:10]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert bns[0].line == 22


def test_nano_known_values(nano):
    _, bns = nano
    np.testing.assert_array_equal(bns[0].variance[:3], np.float32([0.536021, 0.21894373, 0.9839161]))
    np.testing.assert_allclose(bns[0].variance[[3, 12, 13]], [3.0e-7, 2.1e-7, 1.1e-7], rtol=0.05)
    # layer2-bn channels 3, 12, 13 are dead: the denormal 4 * 2**-149 = 5.6e-45.
    assert bns[1].variance[[3, 12, 13]].view("<u4").tolist() == [4, 4, 4]
    assert np.float32(5.6e-45) == bns[1].variance[3]


def test_nano_values_are_byte_for_byte_in_the_caffemodel(nano):
    # Independent check without a protobuf reader: packed float fields are raw float32 runs,
    # and the converter copied biases, scales, mean and variance unchanged.
    _, bns = nano
    blob = NANO_CAFFEMODEL.read_bytes()
    for b in bns:
        for arr in (b.biases, b.scales, b.mean, b.variance):
            assert blob.find(arr.tobytes()) >= 0, f"layer {b.index}"


def test_nano_arrays_are_read_only(nano):
    _, bns = nano
    with pytest.raises(ValueError):
        bns[0].variance[0] = 1.0


def test_nano_extra_bytes(tmp_path):
    weights = tmp_path / "x.weights"
    weights.write_bytes(NANO_WEIGHTS.read_bytes() + b"\0" * 8)
    with pytest.raises(BnfixError, match=r"^x\.weights: 8 unexpected trailing bytes: cfg and weights do not match"):
        read_bn_layers(NANO_CFG, weights)


def test_nano_truncated_names_the_layer(tmp_path):
    weights = tmp_path / "x.weights"
    weights.write_bytes(NANO_WEIGHTS.read_bytes()[:-1000])
    # The last layer is a 1x1 conv 384->75 without BN: 75 biases then 28800 weights.
    with pytest.raises(BnfixError, match=r"^x\.weights: truncated: layer 78 \[convolutional\] needs 1000 more bytes for weights$"):
        read_bn_layers(NANO_CFG, weights)


def test_nano_cfg_mismatch_is_detected(tmp_path):
    cfg = tmp_path / "wrong.cfg"
    cfg.write_text(NANO_CFG.read_text().replace("filters=16\nsize=3\ngroups=16", "filters=16\nsize=3\ngroups=1", 1))
    with pytest.raises(BnfixError, match=r"^MobileNetV2-YOLOv3-Nano-voc\.weights: truncated: layer \d+ "):
        read_bn_layers(cfg, NANO_WEIGHTS)


# -- hand-built pairs: every block has distinct values --------------------------------------

CONNECTED = """
[net]
width=2
height=2
channels=3

[connected]
output=4
batch_normalize=1
activation=leaky

[connected]
output=2
activation=linear
"""


def test_connected_order_biases_weights_then_bn(tmp_path):
    body = (
        run(4, 1)  # biases
        + run(12 * 4, 100)  # weights: inputs = 2*2*3
        + run(4, 10) + run(4, 20) + run(4, 30)  # scales, rolling_mean, rolling_variance
        + run(2, 500) + run(4 * 2, 600)  # second layer: biases, weights (inputs = 4)
    )
    cfg, weights = write_pair(tmp_path, CONNECTED, body)
    _, (bn,) = read_bn_layers(cfg, weights)
    assert (bn.index, bn.kind, bn.channels) == (0, "connected", 4)
    assert bn.biases.tolist() == [1, 2, 3, 4]
    assert bn.scales.tolist() == [10, 11, 12, 13]
    assert bn.mean.tolist() == [20, 21, 22, 23]
    assert bn.variance.tolist() == [30, 31, 32, 33]


GROUPS = """
[net]
width=8
height=8
channels=4

[convolutional]
filters=4
size=3
groups=4
pad=1
batch_normalize=1

[convolutional]
filters=2
size=1
batch_normalize=1
"""


def test_groups_divide_the_weight_count(tmp_path):
    body = (
        run(4, 1) + run(4, 10) + run(4, 20) + run(4, 30) + run(4 // 4 * 4 * 3 * 3, 100)
        + run(2, 201) + run(2, 210) + run(2, 220) + run(2, 230) + run(4 * 2, 300)
    )
    cfg, weights = write_pair(tmp_path, GROUPS, body)
    _, (dw, pw) = read_bn_layers(cfg, weights)
    assert dw.variance.tolist() == [30, 31, 32, 33]
    assert (pw.index, pw.biases.tolist(), pw.scales.tolist()) == (1, [201, 202], [210, 211])
    assert pw.mean.tolist() == [220, 221] and pw.variance.tolist() == [230, 231]


ROUTES = """
[net]
width=4
height=4
channels=3

# 0: 4x4x2
[convolutional]
filters=2
size=1
batch_normalize=1

# 1: 2x2x5
[convolutional]
filters=5
size=3
stride=2
pad=1
batch_normalize=1

# 2: 4x4x5
[upsample]
stride=2

# 3: 4x4x7 (5 + 2)
[route]
layers=-1,0

# 4: needs 7 input channels
[convolutional]
filters=7
size=1
batch_normalize=1

# 5: keeps 4x4x7, AlexeyAB weighted shortcut over two inputs: (2+1)*7 weights
[shortcut]
from=-2,0
weights_type=per_channel

# 6: 7 // 2 = 3 channels (AlexeyAB route groups)
[route]
layers=3
groups=2
group_id=1

# 7: (4 + 1 - 2)/2 + 1 = 2
[maxpool]
size=2
stride=2

# 8: needs 3 input channels
[convolutional]
filters=1
size=1
batch_normalize=1

# 9: 1x1x1
[avgpool]

[yolo]
"""


def conv_bn(n: int, weights: int, tag: int) -> bytes:
    return run(n, tag) + run(n, tag + 10) + run(n, tag + 20) + run(n, tag + 30) + run(weights, 9000)


def test_route_upsample_shortcut_maxpool_shapes(tmp_path):
    body = (
        conv_bn(2, 3 * 2, 100)
        + conv_bn(5, 2 * 5 * 9, 200)
        + conv_bn(7, 7 * 7, 300)
        + run(3 * 7, 7000)  # shortcut weights
        + conv_bn(1, 3 * 1, 400)
    )
    cfg, weights = write_pair(tmp_path, ROUTES, body)
    _, bns = read_bn_layers(cfg, weights)
    assert [b.index for b in bns] == [0, 1, 4, 8]
    assert [b.channels for b in bns] == [2, 5, 7, 1]
    assert [b.variance[0] for b in bns] == [130, 230, 330, 430]


def test_route_reference_out_of_range(tmp_path):
    cfg, weights = write_pair(tmp_path, ROUTES.replace("layers=-1,0", "layers=-1,5"), b"")
    with pytest.raises(BnfixError, match=r"^net\.cfg: line \d+ \[route\] \(layer 3\): layers=-1,5: 5 refers to layer 5, which is not before this one$"):
        read_bn_layers(cfg, weights)


STANDALONE = """
[net]
width=2
height=2
channels=3

[convolutional]
filters=3
size=1
activation=linear

[batchnorm]
"""
CONV_NO_BN = run(3, 1) + run(9, 100)


def test_standalone_batchnorm_pjreddie_layout(tmp_path):
    cfg, weights = write_pair(tmp_path, STANDALONE, CONV_NO_BN + run(3, 10) + run(3, 20) + run(3, 30), (0, 2, 0))
    header, (bn,) = read_bn_layers(cfg, weights)
    assert header.writer == "pjreddie"
    assert (bn.index, bn.kind, bn.channels, bn.biases) == (1, "batchnorm", 3, None)
    assert (bn.scales.tolist(), bn.mean.tolist(), bn.variance.tolist()) == ([10, 11, 12], [20, 21, 22], [30, 31, 32])


def test_standalone_batchnorm_alexeyab_layout(tmp_path):
    body = CONV_NO_BN + run(3, 5) + run(3, 10) + run(3, 20) + run(3, 30)
    cfg, weights = write_pair(tmp_path, STANDALONE, body, (0, 2, 5))
    _, (bn,) = read_bn_layers(cfg, weights)
    assert bn.biases.tolist() == [5, 6, 7]
    assert (bn.scales.tolist(), bn.variance.tolist()) == ([10, 11, 12], [30, 31, 32])


def test_standalone_batchnorm_layout_override(tmp_path):
    body = CONV_NO_BN + run(3, 5) + run(3, 10) + run(3, 20) + run(3, 30)
    cfg, weights = write_pair(tmp_path, STANDALONE, body, (0, 2, 0))  # pjreddie header, AlexeyAB body
    with pytest.raises(BnfixError, match=r"12 unexpected trailing bytes.*matches exactly if standalone \[batchnorm\] layers are stored with biases"):
        read_bn_layers(cfg, weights)
    _, (bn,) = read_bn_layers(cfg, weights, standalone_bn_biases=True)
    assert bn.biases.tolist() == [5, 6, 7] and bn.mean.tolist() == [20, 21, 22]


def test_standalone_batchnorm_wrong_layout_hint_when_short(tmp_path):
    body = CONV_NO_BN + run(3, 10) + run(3, 20) + run(3, 30)
    cfg, weights = write_pair(tmp_path, STANDALONE, body, (0, 2, 5))  # AlexeyAB header, pjreddie body
    with pytest.raises(BnfixError, match=r"truncated: layer 1 \[batchnorm\] needs 12 more bytes for rolling_variance; .*without biases \(pjreddie\)$"):
        read_bn_layers(cfg, weights)


# -- errors ----------------------------------------------------------------------------------


def test_truncated_in_rolling_variance(tmp_path):
    body = conv_bn(2, 3 * 2, 100)
    cut = body[: 4 * (2 + 2 + 2 + 1)]  # biases, scales, mean and one of two variances
    cfg, weights = write_pair(tmp_path, ROUTES, cut, name="tiny")
    with pytest.raises(BnfixError, match=r"^tiny\.weights: truncated: layer 0 \[convolutional\] needs 4 more bytes for rolling_variance$"):
        read_bn_layers(cfg, weights)


def test_trailing_bytes(tmp_path):
    cfg, weights = write_pair(tmp_path, CONNECTED, run(4 + 48 + 12 + 2 + 8, 0) + b"\1\2\3", name="tiny")
    with pytest.raises(BnfixError, match=r"^tiny\.weights: 3 unexpected trailing bytes: cfg and weights do not match \(tiny\.cfg accounts for"):
        read_bn_layers(cfg, weights)


def test_unknown_section(tmp_path):
    cfg, weights = write_pair(tmp_path, CONNECTED + "\n[frobnicate]\nx=1\n", b"", name="odd")
    with pytest.raises(BnfixError, match=r"^odd\.cfg: line 16 \[frobnicate\] \(layer 2\): unknown section type"):
        read_bn_layers(cfg, weights)


def test_bad_option_value(tmp_path):
    cfg, weights = write_pair(tmp_path, GROUPS.replace("filters=2", "filters=two"), b"", name="bad")
    with pytest.raises(BnfixError, match=r"^bad\.cfg: line 15 \[convolutional\] \(layer 1\): filters='two': expected an integer$"):
        read_bn_layers(cfg, weights)


def test_bad_net_option(tmp_path):
    cfg, weights = write_pair(tmp_path, GROUPS.replace("width=8", "width=8.5"), b"", name="bad")
    with pytest.raises(BnfixError, match=r"^bad\.cfg: line 3 \[net\]: width='8\.5': expected an integer$"):
        read_bn_layers(cfg, weights)


def test_first_section_must_be_net(tmp_path):
    cfg, weights = write_pair(tmp_path, "[convolutional]\nfilters=1\n", b"", name="nonet")
    with pytest.raises(BnfixError, match=r"^nonet\.cfg: the first section must be \[net\]"):
        read_bn_layers(cfg, weights)


def test_conv_without_image_input(tmp_path):
    cfg, weights = write_pair(tmp_path, "[net]\n[convolutional]\nfilters=1\n", b"", name="noimg")
    with pytest.raises(BnfixError, match=r"^noimg\.cfg: line 2 \[convolutional\] \(layer 0\): the input is not an image"):
        read_bn_layers(cfg, weights)


def test_recurrent_layers_are_refused_by_name(tmp_path):
    cfg, weights = write_pair(tmp_path, CONNECTED + "[lstm]\noutput=4\n", b"", name="rnn")
    with pytest.raises(BnfixError, match=r"\[lstm\] \(layer 2\): recurrent layers are not supported"):
        read_bn_layers(cfg, weights)


def test_dontload_is_refused(tmp_path):
    cfg, weights = write_pair(tmp_path, GROUPS.replace("filters=2", "filters=2\ndontload=1"), b"", name="dl")
    with pytest.raises(BnfixError, match=r"^dl\.cfg: line 16 \[convolutional\] \(layer 1\): dontload= changes what Darknet reads"):
        read_bn_layers(cfg, weights)


def test_missing_cfg_is_named(tmp_path):
    with pytest.raises(BnfixError, match=r"^gone\.cfg: cannot read"):
        read_bn_layers(tmp_path / "gone.cfg", NANO_WEIGHTS)


# -- property: a random stack of convolutions reads back exactly -----------------------------

layer_spec = st.tuples(
    st.integers(1, 6),  # filters multiplier
    st.sampled_from([1, 3]),  # size
    st.booleans(),  # depthwise (groups = input channels, filters = input channels)
    st.booleans(),  # batch_normalize
    st.sampled_from([1, 2]),  # stride
)


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(layer_spec, min_size=1, max_size=6), channels=st.integers(1, 4))
def test_random_conv_stacks_read_back(tmp_path_factory, specs, channels):
    tmp_path = tmp_path_factory.mktemp("stack")
    cfg = f"[net]\nwidth=16\nheight=16\nchannels={channels}\n"
    body = b""
    expected = []
    c, tag = channels, 1.0
    for index, (mult, size, depthwise, bn, stride) in enumerate(specs):
        n, groups = (c, c) if depthwise else (mult, 1)
        cfg += f"\n[convolutional]\nfilters={n}\nsize={size}\nstride={stride}\npad=1\ngroups={groups}\nbatch_normalize={int(bn)}\n"
        body += run(n, tag)
        if bn:
            body += run(n, tag + 1000) + run(n, tag + 2000) + run(n, tag + 3000)
            expected.append((index, n, tag))
        body += run((c // groups) * n * size * size, -tag)
        c, tag = n, tag + 100
    cfg_path, weights_path = write_pair(tmp_path, cfg, body)
    _, bns = read_bn_layers(cfg_path, weights_path)
    assert [(b.index, b.channels) for b in bns] == [(i, n) for i, n, _ in expected]
    for b, (_, n, t) in zip(bns, expected):
        assert b.biases[0] == t and b.scales[0] == t + 1000 and b.mean[-1] == t + 2000 + n - 1
        assert b.variance.tolist() == list(np.arange(t + 3000, t + 3000 + n, dtype=np.float32))


def test_copy_of_real_pair_reads_identically(tmp_path, nano):
    # The reader depends only on bytes, not on file names or locations.
    cfg = shutil.copy(NANO_CFG, tmp_path / "a.cfg")
    weights = shutil.copy(NANO_WEIGHTS, tmp_path / "b.weights")
    _, bns = read_bn_layers(cfg, weights)
    assert all(np.array_equal(a.variance, b.variance) for a, b in zip(bns, nano[1]))


# -- shapes that only matter through a later layer's weight count ----------------------------


@pytest.mark.parametrize(
    ("net", "middle", "inputs"),
    [
        ("5x5x1", "[maxpool]\nsize=2\nstride=2", 3 * 3),  # (5 + 1 - 2)/2 + 1: default padding = size-1
        ("5x5x1", "[maxpool]\nsize=2\nstride=2\npadding=0", 2 * 2),
        ("5x5x1", "[maxpool]\nsize=3\nstride=1", 5 * 5),  # the SPP case keeps the size
        ("4x4x3", "[avgpool]", 3),
        ("4x4x2", "[reorg]\nstride=2\n\n[avgpool]", 8),
        ("4x4x2", "[reorg3d]\nstride=2\nreverse=1\n\n[avgpool]", 0),  # 2 // 4 channels: an error
        ("4x4x1", "[upsample]\nstride=-2", 2 * 2),  # negative stride downsamples
        ("3x3x2", "[upsample]", 6 * 6 * 2),
        ("6x6x2", "[crop]\ncrop_width=3\ncrop_height=2", 3 * 2 * 2),
        ("4x4x2", "[dropout]\n\n[avgpool]\n\n[scale_channels]\nfrom=0", 4 * 4 * 2),
        ("4x4x2", "[dropout]\n\n[avgpool]\n\n[route]\nlayers=0,1", None),  # 4x4 with 1x1: an error
    ],
)
def test_shapes_feeding_a_connected_layer(tmp_path, net, middle, inputs):
    w, h, c = net.split("x")
    cfg = f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n{middle}\n\n[connected]\noutput=1\n"
    if not inputs:
        cfg_path, weights = write_pair(tmp_path, cfg, b"")
        with pytest.raises(BnfixError, match=r"the output would be 8x8x0|differ in size"):
            read_bn_layers(cfg_path, weights)
        return
    cfg_path, weights = write_pair(tmp_path, cfg, run(1 + inputs, 0))
    assert read_bn_layers(cfg_path, weights)[1] == []
    cfg_path, weights = write_pair(tmp_path, cfg, run(2 + inputs, 0))
    with pytest.raises(BnfixError, match=r"^net\.weights: 4 unexpected trailing bytes"):
        read_bn_layers(cfg_path, weights)


def test_local_layer_weights_per_position(tmp_path):
    cfg = "[net]\nwidth=4\nheight=4\nchannels=2\n\n[local]\nfilters=3\nsize=3\n\n[connected]\noutput=2\nbatch_normalize=1\n"
    # local: out 2x2x3 -> 12 biases, 2*3*3*3 weights per position * 4 positions; connected: 12 inputs
    body = run(12, 0) + run(2 * 3 * 9 * 4, 0) + run(2, 1) + run(12 * 2, 0) + run(2, 10) + run(2, 20) + run(2, 30)
    cfg_path, weights = write_pair(tmp_path, cfg, body)
    _, (bn,) = read_bn_layers(cfg_path, weights)
    assert (bn.index, bn.kind, bn.variance.tolist(), bn.biases.tolist()) == (1, "connected", [30, 31], [1, 2])


def test_deconvolutional_layer(tmp_path):
    cfg = "[net]\nwidth=2\nheight=2\nchannels=3\n\n[deconvolutional]\nfilters=2\nsize=2\nstride=2\nbatch_normalize=1\n\n[connected]\noutput=1\n"
    # deconv: out (2-1)*2 + 2 = 4 -> 4x4x2; weights c*n*size*size = 3*2*4; connected: 32 inputs
    body = run(2, 1) + run(2, 10) + run(2, 20) + run(2, 30) + run(24, 0) + run(1 + 32, 0)
    cfg_path, weights = write_pair(tmp_path, cfg, body, (0, 2, 0))
    _, (bn,) = read_bn_layers(cfg_path, weights)
    assert (bn.kind, bn.channels, bn.scales.tolist(), bn.variance.tolist()) == ("deconvolutional", 2, [10, 11], [30, 31])


def test_shortcut_per_feature_weights(tmp_path):
    cfg = "[net]\nwidth=2\nheight=2\nchannels=1\n\n[dropout]\n\n[shortcut]\nfrom=-1\nweights_type=per_feature\n\n[connected]\noutput=1\nbatch_normalize=1\n"
    body = run(2, 0) + run(1, 5) + run(4, 0) + run(1, 10) + run(1, 20) + run(1, 30)  # (1+1) shortcut weights
    cfg_path, weights = write_pair(tmp_path, cfg, body)
    _, (bn,) = read_bn_layers(cfg_path, weights)
    assert (bn.index, bn.biases.tolist(), bn.variance.tolist()) == (2, [5], [30])


def test_shortcut_bad_weights_type(tmp_path):
    cfg = "[net]\nwidth=2\nheight=2\nchannels=1\n\n[dropout]\n\n[shortcut]\nfrom=-1\nweights_type=lots\n"
    cfg_path, weights = write_pair(tmp_path, cfg, b"", name="sc")
    with pytest.raises(BnfixError, match=r"^sc\.cfg: line 10 \[shortcut\] \(layer 1\): weights_type='lots': expected none"):
        read_bn_layers(cfg_path, weights)
