import datetime as dt

import pytest
import yaml
from pydantic import BaseModel

from moon.config import MoonConfig, default_config_path, load_config, render_yaml
from moon.errors import UserError
from moon.pairs.build import SECTIONS as PAIRS
from moon.train.posttrain import SECTIONS as POSTTRAIN
from moon.train.pretrain import SECTIONS as PRETRAIN


def all_models(model=MoonConfig):
    yield model
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from all_models(candidate)


def test_embedded_default_is_the_demo_world():
    config = load_config()
    assert config.name == "demo"
    assert config.world.items == 2000
    assert config.world.leaf_categories >= 50


@pytest.mark.parametrize("short, long", [("demo", "demo-long"), ("fashion44k", "fashion44k-long")])
def test_a_long_config_retrains_only_the_models(short, long):
    """Over a copy of the short config's run directory, the long one reuses world, pairs and pretraining."""
    configs = default_config_path().parent
    short, long = load_config(configs / f"{short}.yaml"), load_config(configs / f"{long}.yaml")
    assert long.name != short.name  # its own run directory
    for sections in (PAIRS, PRETRAIN):
        assert long.digest(*sections) == short.digest(*sections)
    assert long.digest(*POSTTRAIN) != short.digest(*POSTTRAIN)
    assert long.posttrain.stage1.steps > short.posttrain.stage1.steps


def test_every_shipped_config_loads():
    for path in default_config_path().parent.glob("*.yaml"):
        assert load_config(path).name == path.stem


def test_every_field_has_a_default_and_a_description():
    for model in all_models():
        model()  # every field has a default
        for name, field in model.model_fields.items():
            assert field.description and "\n" not in field.description, f"{model.__name__}.{name}"


def test_overrides_are_typed():
    config = load_config(None, [
        "world.items=500",
        "behaviour.image_query_share=0.5",
        "behaviour.start_date=2026-03-01",
        "ingest.columns.category=[a, b, c]",
        "ingest.spu_from_title=true",
        "behaviour.catalog=null",
    ])
    assert config.world.items == 500
    assert config.behaviour.image_query_share == 0.5
    assert config.behaviour.start_date == dt.date(2026, 3, 1)
    assert config.ingest.columns.category == ["a", "b", "c"]
    assert config.ingest.spu_from_title is True


def test_unknown_key_names_the_key_and_what_is_allowed():
    with pytest.raises(UserError) as err:
        load_config(None, ["world.itemz=5"])
    assert "world.itemz" in str(err.value) and "items" in str(err.value) and "leaf_categories" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(UserError, match=r"'world.items'.*integer"):
        load_config(None, ["world.items=many"])
    with pytest.raises(UserError, match=r"'behaviour.image_query_share'"):
        load_config(None, ["behaviour.image_query_share=1.5"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("world:\n  items: 10\nbehavior:\n  users: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'behavior'.*behaviour"):
        load_config(path)


def test_config_name_defaults_to_the_file_name(tmp_path):
    path = tmp_path / "shop-a.yaml"
    path.write_text("world:\n  items: 10\n")
    assert load_config(path).name == "shop-a"


@pytest.mark.parametrize("override", ["world.items", "=3", "world.items.deep=3"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(UserError, match="override"):
        load_config(None, [override])


def test_rendered_config_reloads_to_the_same_config(tmp_path):
    config = load_config(None, ["world.items=77", "ingest.columns.title=name"])
    text = render_yaml(config)
    assert "# number of items (SKUs) in the catalogue" in text
    path = tmp_path / "again.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["world"]["items"] == 77
    assert load_config(path) == config


def test_override_fills_a_section_the_file_left_null(tmp_path):
    path = tmp_path / "mapped.yaml"
    path.write_text("ingest:\n  columns: null\n")
    assert load_config(path, ["ingest.columns.item_id=sku"]).ingest.columns.item_id == "sku"


def test_overriding_one_task_share_keeps_the_others():
    mix = load_config(None, ["pairs.mix.text->image=0.9"]).pairs.mix
    assert mix["text->image"] == 0.9 and mix["text->richer-text+image"] == 0.5 and len(mix) == 9


def test_schema_defaults_are_neutral_and_the_demo_carries_its_tuned_values():
    neutral = MoonConfig().posttrain
    demo = load_config().posttrain
    for stage in (neutral.stage1, neutral.stage2):
        assert stage.catalogue_pairs == 0 and stage.distill_weight == 0 and stage.hard_negatives == 0
    assert demo.stage1.catalogue_pairs == demo.stage2.catalogue_pairs == 0.8
    assert demo.stage1.steps == 1500 and demo.stage2.lr == 1e-4 and demo.stage2.hard_negatives == 0.5
    assert neutral.from_pretrained and not demo.from_pretrained  # the demo skips pretraining
    assert load_config(default_config_path().with_name("qwen2vl-2b.yaml")).posttrain.stage1.catalogue_pairs == 0


def test_a_config_starts_from_its_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nworld:\n  items: 700\n  brands: 9\nposttrain:\n  stage1:\n    steps: 5\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nworld:\n  items: 300\n")
    child = load_config(tmp_path / "child.yaml", ["posttrain.stage1.lr=0.01"])
    assert child.name == "child"  # its own file's name, never the base's
    assert (child.world.items, child.world.brands) == (300, 9)
    assert (child.posttrain.stage1.steps, child.posttrain.stage1.lr) == (5, 0.01)
    embedded = tmp_path / "embedded.yaml"
    embedded.write_text("base: demo.yaml\nname: mine\n")  # a shipped config by name
    assert load_config(embedded).posttrain.stage1.steps == 1500
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="in a loop"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="nowhere.yaml not found"):
        load_config(tmp_path / "orphan.yaml")


def test_how_a_stage_runs_is_left_out_of_its_digest():
    base = load_config()
    assert load_config(None, ["posttrain.stage1.input_workers=3"]).digest(*POSTTRAIN) == base.digest(*POSTTRAIN)
    assert load_config(None, ["world.workers=5"]).digest("world") == base.digest("world")
    assert load_config(None, ["posttrain.stage1.steps=3"]).digest(*POSTTRAIN) != base.digest(*POSTTRAIN)
