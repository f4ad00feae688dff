"""The field declarations (vgg_jax/configs/fields.py) are the one source: every field declared, every declaration
read, and validation, the resume check, the defaults and docs/config.md follow them."""

import dataclasses
import pathlib
import re

import pytest

from vgg_jax.configs import NETS, PACKAGED, common, fields, finetune, loc, specs, validation
from vgg_jax.configs.tree import flatten, get_field, set_field
from vgg_jax.training import resume

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vgg_jax"
ARGS = ("", "demo", "scale=384", "scale=256-512", "dataset=stl10", "demo,dataset=sample_photos")


def every_config():
    """Every config the packaged files build (each net, each argument; App. A's variants)."""
    for arg in ("", "demo", "scr,fc6-fc7", "demo,classifier"):
        yield f"loc:{arg}", loc.get_config(arg)
    for arg in ("vgg16", "vgg19", "demo"):
        yield f"finetune:{arg}", finetune.get_config(arg)
    for net in sorted(set(NETS) - {"loc", "finetune"}):
        variant = re.search(r'common\.get_config\("([^"]+)"', (PACKAGED / f"{net}.py").read_text()).group(1)
        for arg in ARGS:
            yield f"{net}:{arg}", common.get_config(variant, arg)


def test_every_field_of_every_config_is_declared():
    for name, config in every_config():
        undeclared = sorted(set(flatten(config)) - set(fields.BY_PATH))
        assert not undeclared, f"configs/{name} has fields without a declaration in configs/fields.py: {undeclared}"


def _reader_sources():
    """The package's source outside the declarations and the code that builds configs from them."""
    skip = {"fields.py", "common.py", "loc.py", "validation.py", "specs.py"}
    return {p: p.read_text() for p in PACKAGE.rglob("*.py") if not (p.parent.name == "configs" and p.name in skip)}


def _reads(source: str, path: str) -> bool:
    """`source` names the field: its last name as an attribute or a key, and its group's name likewise."""
    names = path.split(".")
    return all(re.search(rf"\.{n}\b|[\"']{n}[\"']", source) for n in names)


def test_every_declaration_has_a_reader():
    sources = _reader_sources()
    unread = [f.path for f in fields.FIELDS if not any(_reads(text, f.path) for text in sources.values())]
    assert not unread, f"declared in configs/fields.py but read by no module: {unread}"


def test_the_reader_scan_finds_a_missing_reader():
    assert not any(_reads(text, "model.no_such_knob") for text in _reader_sources().values())
    assert any(_reads(text, "spike_guard.window") for text in _reader_sources().values())


def test_defaults_come_from_the_declarations(monkeypatch):
    assert common.get_config("D").crop_size == fields.BY_PATH["crop_size"].default
    monkeypatch.setattr(fields, "FIELDS", tuple(_changed("momentum", default=0.5)))
    assert common.get_config("D").momentum == 0.5


def _changed(path, **changes):
    for field in fields.FIELDS:
        yield dataclasses.replace(field, **changes) if field.path == path else field


def test_validation_follows_the_declarations(monkeypatch):
    config = common.get_config("A")  # net A: no warm start to name
    config.momentum = 0.95
    validation.validate(config)
    monkeypatch.setattr(fields, "FIELDS", tuple(_changed("momentum", spec=specs.number(0, 0.9))))
    assert "config.momentum=0.95: expected a finite number in [0, 0.9]" in str(
        pytest.raises(ValueError, validation.validate, config).value
    )


def test_resume_follows_the_declarations(monkeypatch):
    assert resume.effect("log_every_steps") == "how often it logs"
    assert resume.effect("momentum") is None and resume.effect("no_such_field") is None
    assert resume.effect("tf_data_threads") is not None  # declared, settable, and free to change
    monkeypatch.setattr(resume, "BY_PATH", {f.path: f for f in _changed("momentum", may_change="the momentum")})
    assert resume.effect("momentum") == "the momentum"


def test_absent_optional_fields_mean_their_default():
    saved = common.get_config("D").to_dict()
    del saved["resample_canvas"], saved["tf_data_threads"]
    assert resume.differences(saved, common.get_config("D").to_dict()) == []


def test_docs_field_list_is_the_declarations():
    page = (REPO / "docs" / "config.md").read_text()
    table = page.split("<!-- fields.markdown_table() -->\n", 1)[1]
    assert table == fields.markdown_table(), "regenerate docs/config.md's table (see the page's introduction)"
    assert all(f"`{f.path}`" in table for f in fields.FIELDS)


def test_flatten_and_the_dotted_setter():
    config = common.get_config("D")
    flat = flatten(config)
    assert flat["model.variant"] == "D" and flat["plateau.patience"] == 3 and "model" not in flat
    assert flatten({"preprocessing": {"a": "b"}}) == {"preprocessing": {"a": "b"}}  # a mapping field stays one
    assert flatten({"mean_rgb": (1, 2, 3)}, stringify=True) == {"mean_rgb": "(1, 2, 3)"}
    set_field(config, "warm_start.checkpoint", "/runs/a")
    assert get_field(config, "warm_start.checkpoint") == "/runs/a" and get_field(config, "loc.top_k", 7) == 7
    with pytest.raises(KeyError, match="config.loc.top_k: the config has no group 'loc'"):
        set_field(config, "loc.top_k", 3)
