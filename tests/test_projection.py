import pytest
import torch
from torch.nn import functional as F

from xbt import FingerprintMismatchError, InputError
from xbt.adapter_config import PROJECTION_KINDS
from xbt.projection import KIND_BUILDERS, Projection, ProjectionConfig


def test_every_listed_kind_has_a_builder_and_every_builder_a_listing():
    assert list(KIND_BUILDERS) == list(PROJECTION_KINDS)
    for kind, (_, options) in PROJECTION_KINDS.items():  # a kind builds with the options it lists
        shape = {"hidden_dim": 8, "extra_dims": 2}
        psi = Projection(6, 4, kind=kind, **{option: shape[option] for option in options})
        assert psi(torch.randn(3, 6)).shape == (3, 4)


@pytest.mark.parametrize("kind", ["linear", "mlp", "orthogonal"])
def test_outputs_are_unit_vectors_of_the_old_dimension(kind):
    psi = Projection(48, 32, kind=kind)
    out = psi(torch.randn(5, 48))
    assert out.shape == (5, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_mlp_starts_as_its_linear_path():
    psi = Projection(16, 8, kind="mlp")
    x = torch.randn(4, 16)
    torch.testing.assert_close(psi.extended(x), psi.linear(x))


def test_orthogonal_map_is_an_isometry_with_extra_dims():
    psi = Projection(24, 16, kind="orthogonal", extra_dims=8)
    weight = psi.linear.weight  # (24, 24): square, hence orthogonal
    torch.testing.assert_close(weight @ weight.T, torch.eye(24), atol=1e-5, rtol=0)
    x = torch.randn(3, 24)
    torch.testing.assert_close(psi.extended(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)
    assert psi(x).shape == (3, 16)


@pytest.mark.parametrize("kind", ["linear", "mlp", "orthogonal"])
def test_save_and_load_round_trip_through_safetensors(kind, tmp_path, capsys):
    psi = Projection(12, 10, kind=kind, source_space="hf-aaaa", target_space="open_clip-bbbb")
    with torch.no_grad():
        for parameter in psi.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    psi.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    loaded = Projection.from_pretrained(tmp_path)
    x = torch.randn(6, 12)
    torch.testing.assert_close(loaded(x), psi(x))
    assert (loaded.kind, loaded.source_space, loaded.target_space) == (kind, "hf-aaaa", "open_clip-bbbb")
    assert capsys.readouterr().out == ""  # a local load prints nothing into a command's output


def test_refuses_other_models_and_wrong_dimensions():
    psi = Projection(12, 10, source_space="hf-aaaa", target_space="open_clip-bbbb")
    psi.check_spaces("hf-aaaa", "open_clip-bbbb")
    with pytest.raises(FingerprintMismatchError, match="space hf-cccc.*space hf-aaaa.*another new model"):
        psi.check_spaces(source="hf-cccc")
    with pytest.raises(InputError, match="dimension 12, got 7"):
        psi(torch.randn(2, 7))


def test_from_linear_map_and_build():
    weight = torch.randn(4, 6)
    psi = Projection.from_linear_map(weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(psi(x), torch.nn.functional.normalize(x @ weight.T, dim=-1))
    built = Projection.build(6, 4, ProjectionConfig(kind="orthogonal", extra_dims=2))
    assert (built.extra_dims, built.full_dim, built.extended(x).shape) == (2, 6, (3, 6))


# Each bad shape, through the config and through the constructor alike: the message names option and value.
BAD_SHAPES = [
    ({"kind": "quadratic"}, "kind must be one of ['linear', 'mlp', 'orthogonal'], got 'quadratic'"),
    ({"kind": "linear", "extra_dims": 4}, "extra_dims applies to kind 'orthogonal' only and must be >= 0, "
                                          "got extra_dims=4 with kind 'linear'"),
    ({"kind": "orthogonal", "extra_dims": -1}, "extra_dims applies to kind 'orthogonal' only and must be >= 0, "
                                               "got extra_dims=-1 with kind 'orthogonal'"),
    ({"kind": "mlp", "hidden_dim": 0}, "hidden_dim applies to kind 'mlp' only and must be at least 1, "
                                       "got hidden_dim=0 with kind 'mlp'"),
    ({"kind": "linear", "hidden_dim": 16}, "hidden_dim applies to kind 'mlp' only and must be at least 1, "
                                           "got hidden_dim=16 with kind 'linear'"),
]


@pytest.mark.parametrize("options,message", BAD_SHAPES, ids=[str(o) for o, _ in BAD_SHAPES])
def test_bad_shapes_are_input_errors(options, message):
    for make in (lambda: ProjectionConfig(**options), lambda: Projection(6, 4, **options)):
        with pytest.raises(InputError) as caught:
            make()
        assert str(caught.value) == message



def test_split_gives_the_compatible_part_and_the_full_vector_of_one_pass():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(5, 8), dim=-1)
    psi = Projection(8, 4, kind="orthogonal", extra_dims=3)
    compatible, full = psi.split(x)
    torch.testing.assert_close(compatible, psi(x))
    torch.testing.assert_close(full, F.normalize(psi.extended(x), dim=-1))
    assert full.shape == (5, 7)
    assert Projection(8, 4, kind="linear").split(x)[1] is None  # no extra dims: no full space
