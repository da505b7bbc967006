"""torch.fx tracing of the vision families with timm's tracer (feature extraction, timm's FX
tests), and torch.jit.script's refusal that points to the TorchScript export."""

import pytest
import torch

import esh
from esh.layers.padding import crop_to, pad_to_multiple

timm = esh._compat.import_timm()
create_feature_extractor = timm.models.create_feature_extractor
get_graph_node_names = timm.models.get_graph_node_names

VISION_MODELS = [n for n in esh.list_models() if n.startswith(("mambavision", "vim", "esh_vision"))]

# (name, builder overrides, input sizes): the native size first; the others need padding
# (MambaVision's windows, ESH-Vision's patches, merges and windows) or a non-square grid
SMALL_MODELS = [
    ("mambavision_nano", {}, [(56, 56), (72, 72), (40, 88)]),
    ("vim_tiny", dict(img_size=32, depth=4), [(32, 32)]),
    ("vim_tiny_s8", dict(img_size=(32, 48), depth=4), [(32, 48)]),
    ("vim_tiny", dict(img_size=32, depth=4, dynamic_img_size=True), [(32, 32), (48, 64), (16, 40)]),
    ("esh_vision_nano", {}, [(56, 56), (50, 38)]),
]
SMALL_MODEL_IDS = ["mambavision_nano", "vim_tiny", "vim_tiny_s8", "vim_tiny_dynamic_img_size", "esh_vision_nano"]


def traced(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward as a GraphModule, as timm's FX tests build it: timm's leaf modules and
    autowrapped functions, the last node of the graph (the classifier, see the test below) as
    the output."""
    return create_feature_extractor(model, {"head": "out"})


@pytest.mark.parametrize("name", VISION_MODELS)
def test_every_registered_vision_model_traces(name):
    with torch.device("meta"):
        model = esh.create_model(name).eval()
    _, nodes = get_graph_node_names(model)
    assert nodes[0] == "x" and nodes[-1] == "head"
    assert nodes[1] in ("check_image_batch", "check_vim_input")  # the input check stays in the graph


def test_every_family_is_tested_for_values():
    families = {name.split("_")[0] for name in VISION_MODELS}
    assert families == {name.split("_")[0] for name, _, _ in SMALL_MODELS} == {"mambavision", "vim", "esh"}


@pytest.mark.parametrize("name, overrides, sizes", SMALL_MODELS, ids=SMALL_MODEL_IDS)
def test_traced_graph_equals_eager_at_every_size(name, overrides, sizes):
    model = esh.create_model(name, **overrides).eval()
    graph = traced(model)  # traced once: sizes stay symbolic, padding is decided per call
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
            got = graph(x)["out"]
        assert got.shape == expected.shape
        assert torch.equal(got, expected), size


def test_traced_graph_equals_eager_with_hard_routing():
    model = esh.create_model("esh_vision_nano").eval().set_routing("hard", attention_fraction=0.25)
    graph = traced(model)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(graph(x)["out"], model(x))


@pytest.mark.parametrize("name", ["mambavision_nano", "esh_vision_nano"])
def test_traced_graph_gradients_equal_eager(name):
    model = esh.create_model(name, num_classes=5).train()
    graph = traced(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 3, 72, 72)
    torch.manual_seed(1)
    expected = torch.autograd.grad(model(x).square().sum(), params, allow_unused=True)
    torch.manual_seed(1)
    got = torch.autograd.grad(graph(x)["out"].square().sum(), params, allow_unused=True)
    assert sum(g is not None for g in got) == sum(g is not None for g in expected) > 0
    for g, e in zip(got, expected):
        # not bit-exact: the order of an indexed accumulation (relative-position bias tables)
        # varies from run to run, in eager too
        assert (g is None and e is None) or torch.allclose(g, e, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "name, overrides, nodes, size",
    [
        ("mambavision_nano", {}, ["levels.1", "levels.2", "levels.3.blocks.1.mixer", "norm"], (72, 72)),
        ("vim_tiny", dict(img_size=32), ["layers.1.mixer", "layers.23.norm", "norm_f"], (32, 32)),
        ("esh_vision_nano", {}, ["patch_embed", "stages.2.downsample", "norm"], (50, 38)),
    ],
    ids=["mambavision", "vim", "esh_vision"],
)
def test_feature_extractor_returns_the_modules_outputs(name, overrides, nodes, size):
    model = esh.create_model(name, **overrides).eval()
    extractor = create_feature_extractor(model, nodes)
    seen = {}
    for node in nodes:
        model.get_submodule(node).register_forward_hook(lambda m, i, o, node=node: seen.__setitem__(node, o))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = extractor(x)
        model(x)
    assert list(features) == nodes
    for node in nodes:
        assert torch.equal(features[node], seen[node]), node


@pytest.mark.parametrize(
    "name, overrides, bad, message",
    [
        ("mambavision_nano", {}, torch.randn(1, 1, 56, 56), "3 input channels"),
        ("vim_tiny", dict(img_size=32), torch.randn(1, 3, 48, 48), r"built for inputs \(batch, 3, 32, 32\)"),
        ("esh_vision_nano", {}, torch.zeros(1, 3, 56, 56, dtype=torch.long), "floating-point"),
    ],
    ids=["mambavision", "vim", "esh_vision"],
)
def test_traced_graph_keeps_the_input_checks(name, overrides, bad, message):
    graph = traced(esh.create_model(name, **overrides).eval())
    with pytest.raises(ValueError, match=message):
        graph(bad)


@pytest.mark.parametrize(
    "name, overrides",
    [("mambavision_nano", {}), ("vim_tiny", dict(img_size=32, depth=2)), ("esh_vision_nano", {})],
    ids=["mambavision", "vim", "esh_vision"],
)
def test_torch_jit_script_refuses_and_points_to_the_export(name, overrides):
    model = esh.create_model(name, **overrides).eval()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*esh export --format torchscript"):
        torch.jit.script(model)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pad_to_multiple_pads_right_and_bottom_with_zeros(channels_last):
    x = torch.randn(2, 3, 5, 6)
    x = x.permute(0, 2, 3, 1) if channels_last else x
    y = pad_to_multiple(x, 4, channels_last=channels_last)
    y, x = (y.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)) if channels_last else (y, x)
    assert y.shape == (2, 3, 8, 8)
    assert torch.equal(y[:, :, :5, :6], x)
    assert not y[:, :, 5:].any() and not y[:, :, :, 6:].any()
    assert torch.equal(crop_to(y, 5, 6), x)


def test_padding_and_crop_return_the_input_when_it_fits():
    x = torch.randn(1, 2, 8, 12)
    assert pad_to_multiple(x, 4) is x
    assert pad_to_multiple(x.permute(0, 2, 3, 1), 4, channels_last=True).data_ptr() == x.data_ptr()
    assert crop_to(x, 8, 12) is x
