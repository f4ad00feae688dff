"""Config validation: every declared field checked before any work, all problems in one message."""

import json
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest

from vgg_jax.configs import common, fields, finetune, specs, validation
from vgg_jax.configs.tree import set_field

REPO = pathlib.Path(__file__).resolve().parents[1]
NETS = ("A", "A-LRN", "B", "C", "D", "E")
ARGS = (None, "scale=256", "scale=384", "scale=256-512", "dataset=stl10", "demo", "scale=384,dataset=stl10")

# Bad values for every field of the table: wrong types and out-of-range values. The test below
# fails when a field is added to the table (or to configs/common.py) without bad values here.
BAD = {
    "seed": [-1, 2**31, 1.5, "0", True],
    "model.variant": ["F", "d", 4],
    "model.num_classes": [1, -1, 10.0, "10"],
    "model.width_multiplier": [0, -0.5, "1", math.nan],
    "model.fc_width": [-1, 4096.0],
    "model.dropout_rate": [1.0, -0.1, "0.5"],
    "model.initializer": ["uniform", None],
    "model.init_std": [0.0, -1.0],
    "model.lrn_alpha_over_size": [1, "False"],
    "compute_dtype": ["float16", "fp32", "float64"],
    "remat": [0, "yes"],
    "dataset": [3, None],
    "data_dir": [None, 3],
    "download": ["no", 0],
    "train_split": ["", 1],
    "eval_split": ["  ", None],
    "crop_size": [100, 0, 16, 224.0],
    "scale_min": [0, "256"],
    "scale_max": [0, 256.5],
    "eval_scale": [0, -1],
    "eval_method": ["multi_crop", 1],
    "dense_pooling": ["round", "Ceil", None, 1],
    "resize_method": ["bilinear", None],
    "random_flip": ["True", 1],
    "resample_on_device": ["yes", 1],
    "resample_canvas": [-1, 1.5],
    "color_shift_std": [-0.1, "0.1"],
    "mean_rgb": [(1.0, 2.0), (1, 2, 300), "123", (1, 2, "3")],
    "shuffle_buffer": [0, 1.5],
    "corrupt_images": ["ignore", None],
    "input_shards": [-1, 2.0],
    "global_batch_size": [0, -256, 256.0],
    "eval_batch_size": [0, "256"],
    "num_epochs": [-1.0, "74", math.inf],
    "num_train_steps": [0, -2, 1.5],
    "learning_rate": [0.0, -0.01, "1e-2"],
    "momentum": [1.0, -0.1, 1.5],
    "weight_decay": [-5e-4, "0"],
    "decay_biases": ["no", None],
    "lr_schedule": ["cosine", None],
    "plateau.factor": [0.0, 1.0, 10],
    "plateau.patience": [0, -1, 2.5],
    "plateau.threshold": [-0.1, "0"],
    "plateau.cooldown": [-1, 0.5],
    "plateau.max_reductions": [-1, 3.0],
    "step_boundaries_epochs": [(30.0, 20.0), (0.0, 10.0), (30.0, 30.0), 30.0, ("30",)],
    "warm_start.checkpoint": [None, 3],
    "warm_start.step": ["first", -1, 1.5, "-1"],
    "warm_start.layers": ["everything", ("conv6_1",), 3, ("fc6", 7), ("all", "fc8")],
    "log_every_steps": [-1, 0],
    "log_layer_stats": ["yes", 1],
    "eval_every_steps": [0, -2],
    "checkpoint_every_steps": [0, -1],
    "keep_checkpoints": [0, -1],
    "keep_best_checkpoints": [-1, 1.0],
    "stop_after_steps": [0, -5],
    "spike_guard.factor": [1.0, -2.0, 0.5, "3", math.inf],
    "spike_guard.window": [0, 2.5],
    "spike_guard.max_retries": [-1, 1.0],
    "distributed.initialize": ["maybe", True],
    "distributed.coordinator_address": ["localhost", 1234, "host: 12"],
    "distributed.num_processes": [0, -2],
    "distributed.process_id": [-2, 1.0],
    "distributed.heartbeat_timeout_seconds": [0, "60"],
    "distributed.initialization_timeout_seconds": [0, "300"],
    "class_names": ["cat,dog", ("cat", 1)],
    "class_wnids": ["n01440764", ("n01440764", 1)],
    "model.include_top": ["yes", 1],
    "preprocessing": ["caffe", {"source": 1}],
    "tf_data_threads": [-1, 2.5, "4"],
    "finetune.freeze_through": ["conv6_1", 3, None],
    "finetune.body_lr_multiplier": [-0.1, "0.1", float("inf")],
    "finetune.head_layers": ["everything", ("fc9",), 8],
}


def paper_config(net, arg=None):
    """The paper's recipe, with the run it starts from where it starts from one (§3.1: net A, or the previous S)."""
    config = common.get_config(net, arg)
    if specs.warm_start_layers(config.warm_start.layers):
        config.warm_start.checkpoint = "runs/previous"
    return config


def default_dict():
    """The paper's recipe as the plain nested dict a config.json holds (any value can be set)."""
    return paper_config("D").to_dict()


def dict_with(path):
    """default_dict(), or for the fields of an optional group the recipe that has it (finetune.py)."""
    if path.startswith("finetune."):
        config = finetune.get_config()
        config.dataset = "folder:/photos"
        return config.to_dict()
    return default_dict()


def with_value(config, path, value):
    set_field(config, path, value)
    return config


def message(config):
    with pytest.raises(ValueError) as info:
        validation.validate(config)
    return str(info.value)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("arg", ARGS)
def test_paper_configs_validate(net, arg):
    validation.validate(paper_config(net, arg))


def test_the_tests_cover_every_field_outside_app_a():
    assert set(BAD) == {field.path for field in fields.FIELDS if field.where != "loc"}


@pytest.mark.parametrize("path", sorted(BAD))
def test_every_field_with_a_bad_value_is_named_with_the_value(path):
    for value in BAD[path]:
        text = message(with_value(dict_with(path), path, value))
        assert "(1 problem)" in text, (path, value, text)
        assert f"config.{path}={value!r}: expected " in text, (path, value, text)


def test_float16_is_refused_with_the_reason():
    text = message(with_value(default_dict(), "compute_dtype", "float16"))
    assert "float16" in text and "loss scaling" in text and "bfloat16" in text


def test_special_values_are_allowed():
    config = default_dict()
    for path, value in [
        ("eval_every_steps", -1),
        ("num_train_steps", -1),
        ("stop_after_steps", -1),
        ("input_shards", 0),
        ("distributed.num_processes", -1),
        ("distributed.process_id", -1),
        ("keep_best_checkpoints", 0),
        ("warm_start.step", "latest"),
        ("warm_start.step", 7),
        ("warm_start.step", "7"),  # what --config.warm_start.step=7 gives
        ("warm_start.layers", "all"),
        ("warm_start.layers", ("all",)),  # what --config.warm_start.layers=all gives on a tuple field
        ("warm_start.layers", "conv1_1, fc8"),
        ("warm_start.layers", ["conv1_1", "conv5_4"]),
        ("warm_start.layers", ()),
        ("distributed.coordinator_address", "10.0.0.1:1234"),
        ("mean_rgb", [0, 0, 0]),  # JSON gives lists
        ("step_boundaries_epochs", []),
    ]:
        validation.validate(with_value(config, path, value))


def test_warm_start_layers_normalised():
    assert specs.warm_start_layers("all") == "all"
    assert specs.warm_start_layers(("all",)) == "all"
    assert specs.warm_start_layers(("conv1_1,fc8",)) == ("conv1_1", "fc8")
    assert specs.warm_start_layers(" conv1_1 , fc8 ") == ("conv1_1", "fc8")
    assert specs.warm_start_layers("") == ()
    with pytest.raises(ValueError, match="conv9_1"):
        specs.warm_start_layers(("conv9_1",))


# --------------------------------------------------------------------------- cross-field rules


CROSS_FIELD = [  # (fields set, the one problem reported)
    ({"scale_min": 384, "scale_max": 256}, "config.scale_min=384 > config.scale_max=256"),
    (
        {"crop_size": 256, "scale_min": 240, "scale_max": 300, "eval_scale": 300},
        "config.crop_size=256 > config.scale_min=240",
    ),
    ({"eval_scale": 200}, "config.eval_scale=200 < config.crop_size=224"),
    ({"num_epochs": 0.0}, "config.num_epochs=0.0 with config.num_train_steps=-1"),
    ({"input_shards": 3}, "config.global_batch_size=256 is not divisible by config.input_shards=3"),
    (
        {"distributed.num_processes": 4, "distributed.process_id": 4},
        "config.distributed.process_id=4 >= config.distributed.num_processes=4",
    ),
    ({"class_names": ["cat", "dog"]}, "config.class_names has 2 names but config.model.num_classes=1000"),
    ({"dataset": ""}, "config.dataset=''"),
    ({"keep_checkpoints": 0, "keep_best_checkpoints": 0}, "config.keep_checkpoints=0"),
    (
        {"warm_start.checkpoint": ""},
        "config.warm_start.layers=('conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'fc6', 'fc7', 'fc8') "
        "with config.warm_start.checkpoint=''",
    ),
]


@pytest.mark.parametrize("fields, problem", CROSS_FIELD)
def test_cross_field_rules(fields, problem):
    config = default_dict()
    for path, value in fields.items():
        with_value(config, path, value)
    text = message(config)
    assert "(1 problem)" in text and problem in text, text


def test_cross_field_rules_allow_the_alternatives():
    config = default_dict()
    config.update(num_epochs=0.0, num_train_steps=100)  # steps instead of epochs
    validation.validate(config)
    config.update(dataset="", class_names=None, preprocessing={"source": "keras", "weights": "w.h5"})  # converted
    validation.validate(config)


def test_rules_skip_fields_already_reported():
    config = default_dict()
    config.update(scale_min="384")  # a type error, not also a scale-range or crop violation
    text = message(config)
    assert "(1 problem)" in text and "config.scale_min='384': expected an integer" in text


# --------------------------------------------------------------------------- the whole config


def test_all_problems_in_one_message_one_line_each():
    config = default_dict()
    config["model"]["dropout_rate"] = 1.5
    config.update(compute_dtype="float16", log_every_steps=0, scale_min=512, lerning_rate=0.1)
    config["plateau"]["factor"] = 2.0
    text = message(config)
    lines = text.splitlines()
    assert lines[0] == "invalid config (6 problems):"
    for fragment in (
        "config.model.dropout_rate=1.5",
        "config.compute_dtype='float16'",
        "config.log_every_steps=0",
        "config.scale_min=512 > config.scale_max=256",
        "config.lerning_rate=0.1: unknown field",
        "config.plateau.factor=2.0",
    ):
        assert sum(fragment in line for line in lines[1:]) == 1, (fragment, text)


def test_unknown_fields_are_named_with_a_guess():
    config = default_dict()
    config["lerning_rate"] = 0.1
    config["model"]["dropout"] = 0.5
    text = message(config)
    assert "config.lerning_rate=0.1: unknown field" in text and "did you mean config.learning_rate?" in text
    assert "config.model.dropout=0.5: unknown field" in text and "config.model.dropout_rate" in text


def test_missing_fields_and_groups_are_named():
    config = default_dict()
    del config["crop_size"], config["plateau"], config["model"]["variant"]
    text = message(config)
    assert "config.crop_size is missing" in text
    assert "config.plateau is missing" in text and "config.plateau.factor" not in text
    assert "config.model.variant is missing" in text
    assert "resize_method" not in text  # optional
    del config["distributed"]  # optional group
    assert "distributed" not in message(config)


def test_a_group_replaced_by_a_value_is_named():
    config = default_dict()
    config["model"] = "D"
    text = message(config)
    assert "(1 problem)" in text and "config.model='D': expected a group of fields" in text


def test_a_warm_start_without_its_run_is_refused_with_both_ways_out():
    """§3.1: D, E (from net A) and S=384 / jittered nets (from the previous S) need a run to start from."""
    for net, arg in (("D", None), ("E", "scale=384"), ("A", "scale=256-512")):
        text = message(common.get_config(net, arg))
        assert "(1 problem)" in text and "config.warm_start.checkpoint=''" in text, text
        assert "--config.warm_start.checkpoint=RUN_DIR" in text and "--config.warm_start.layers=''" in text
    validation.validate(common.get_config("A"))  # net A trains from random init: nothing to start from
    config = common.get_config("D")
    config.warm_start.layers = ()  # random init on purpose
    validation.validate(config)


def test_the_command_line_refuses_a_deeper_net_without_net_a_before_any_work(command_lines, tmp_path):
    """`python -m vgg_jax.main --config=configs/d.py` with no warm-start run: refused, nothing written; the second
    way out (layers='') gets past validation (here to the next check: a data set that does not exist)."""
    command = ["vgg_jax.main", "--config=configs/d.py", f"--workdir={tmp_path / 'd256'}"]
    refused = command_lines.run(*command)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "config.warm_start.checkpoint=''" in refused.stderr and "RUN_DIR" in refused.stderr
    assert "--config.warm_start.layers=''" in refused.stderr
    assert not (tmp_path / "d256").exists()
    accepted = command_lines.run(*command, "--config.warm_start.layers=", "--config.dataset=no_such_set")
    assert accepted.returncode == 1 and "warm_start" not in accepted.stderr.split("error:")[-1]
    assert "config.dataset='no_such_set'" in accepted.stderr


def test_config_dicts_and_their_json_validate():
    config = paper_config("E", "scale=256-512")
    validation.validate(config.copy_and_resolve_references())
    validation.validate(json.loads(json.dumps(config.to_dict())))  # a run's config.json: lists, not tuples
    import ml_collections

    validation.validate(ml_collections.FrozenConfigDict(config))
    config.unlock()
    config.no_such_field = 3
    assert "config.no_such_field=3: unknown field" in message(config)


def test_variants_are_the_models_tuple_alone():
    from vgg_jax import models

    for variant in models.VARIANTS:
        validation.validate(with_value(default_dict(), "model.variant", variant))
    defined = [path.name for path in (REPO / "vgg_jax").rglob("*.py") if "\nVARIANTS = " in path.read_text()]
    assert defined == ["models.py"]


def test_validation_imports_no_tensorflow():
    # Loaded by path so that the vgg_jax package's __init__ is not imported; the models (JAX) are.
    code = textwrap.dedent(
        f"""
        import importlib.util, sys, types
        # Bare stand-ins for the packages, so that `from vgg_jax.configs.specs import …` loads just that file.
        for name, path in (("vgg_jax", "vgg_jax"), ("vgg_jax.configs", "vgg_jax/configs")):
            package = sys.modules[name] = types.ModuleType(name)
            package.__path__ = [{str(REPO)!r} + "/" + path]
        spec = importlib.util.spec_from_file_location("validation", {str(REPO / "vgg_jax/configs/validation.py")!r})
        module = sys.modules["validation"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "config.seed is missing: expected an integer in [0, 2147483647]" in module.problems({{}})
        heavy = [name for name in ("tensorflow", "tensorflow_datasets", "optax", "orbax") if name in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_only_weights_without_the_head_may_have_no_classes():
    headless = with_value(with_value(default_dict(), "model.num_classes", 0), "model.fc_width", 0)
    with pytest.raises(ValueError, match=r"num_classes=0, model.fc_width=0: .*model.include_top=False"):
        validation.validate(headless)
    headless["model"]["include_top"] = False  # converted 'notop' weights: the conv layers only
    validation.validate(headless)
