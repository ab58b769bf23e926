"""Configs: every shipped YAML loads, ${VAR} expansion, errors that name the flag the user typed."""

from pathlib import Path

import pytest

from jobembed.config import PipelineConfig, load_config, section_for_key
from jobembed.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.setenv("JOBEMBED_DATA", "/data")
    assert isinstance(load_config(path), PipelineConfig)


def test_unset_variable_without_default_is_named(tmp_path, monkeypatch):
    """Reproduces: an unset ${VAR} silently became an empty string."""
    monkeypatch.delenv("NO_SUCH_VAR_FOR_TESTS", raising=False)
    (tmp_path / "c.yaml").write_text("prepare:\n  input: ${NO_SUCH_VAR_FOR_TESTS}/ads.csv\n")
    with pytest.raises(ConfigError, match=r"'prepare.input' uses \$\{NO_SUCH_VAR_FOR_TESTS\}"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("prepare:\n  input: ${NO_SUCH_VAR_FOR_TESTS:-/fallback}/ads.csv\n")
    assert str(load_config(tmp_path / "d.yaml").prepare.input) == "/fallback/ads.csv"


@pytest.mark.parametrize(
    ("overrides", "flags", "needle"),
    [
        ({"report.systems": ["mlp", "svm"]}, {"report.systems": "--systems"}, "--systems"),
        ({"head.class_weight": "heavy"}, {"head.class_weight": "--class-weight"}, "--class-weight"),
        ({"prepare.test_size": 0.9, "prepare.val_size": 0.9}, {"prepare.test_size": "--test-size"}, "--test-size"),
        ({"report.systems": ["mlp", "svm"]}, None, "config field 'report.systems.1'"),
        # a check across sections names its fields itself (was "config field '': report.finetune_cv needs ...")
        ({"report.finetune_cv": True}, None, r"c\.yaml: report\.finetune_cv needs finetune\.enabled"),
    ],
)
def test_invalid_override_names_the_flag(tmp_path, overrides, flags, needle):
    """Reproduces: a bad --systems value was reported against config.yaml instead of the flag."""
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / "c.yaml", overrides, flags=flags)


def test_runtime_fields_stay_out_of_stage_keys():
    a = PipelineConfig.model_validate({"embed": {"batch_size": 8, "device": "cpu"}})
    b = PipelineConfig.model_validate({"embed": {"batch_size": 64, "device": "auto"}})
    c = PipelineConfig.model_validate({"embed": {"max_seq_length": 128}})
    assert section_for_key(a.embed) == section_for_key(b.embed) != section_for_key(c.embed)


def test_fusions_prior_correction_keys_the_report_only_when_set():
    """report.hybrid.prior_power came after runs were made: at 0 (what they had) their report keys stay as they
    were; set, it is in the key (a report with the correction is another report)."""
    off = section_for_key(PipelineConfig.model_validate({}).report)
    on = section_for_key(PipelineConfig.model_validate({"report": {"hybrid": {"prior_power": 0.4}}}).report)
    assert "prior_power" not in off["hybrid"] and on["hybrid"]["prior_power"] == 0.4
    assert {k: v for k, v in on["hybrid"].items() if k != "prior_power"} == off["hybrid"]


def test_the_triplet_margin_keys_the_fine_tune_only_when_set():
    off = section_for_key(PipelineConfig.model_validate({"finetune": {"loss": "batch_hard"}}).finetune)
    on = section_for_key(
        PipelineConfig.model_validate({"finetune": {"loss": "batch_hard", "triplet_margin": 0.5}}).finetune
    )
    assert "triplet_margin" not in off and on["triplet_margin"] == 0.5


def test_a_triplet_margin_without_a_margin_loss_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"triplet_margin 0\.5 acts on the losses batch_hard, batch_all, triplet"):
        load_config(None, {"finetune.loss": "classifier", "finetune.triplet_margin": 0.5})


def test_a_later_fields_default_changed_afterwards_changes_the_key():
    """Reproduces: a field added later was left out of the key while at *today's* default, so flipping its default
    (say embed.backend torch -> onnx-int8) would give new int8 runs the key of old torch runs: stale vectors reported
    as up to date. It is left out only while it holds the value runs had before it existed."""
    from types import MappingProxyType

    from jobembed.config import Strict

    class Section(Strict):
        LATER_FIELDS = MappingProxyType({"backend": "torch"})
        size: int = 1
        backend: str = "onnx-int8"  # the default flipped after the field was added

    before_the_field = {"size": 1}
    assert section_for_key(Section(backend="torch")) == before_the_field  # old runs keep their key
    assert section_for_key(Section()) == {"size": 1, "backend": "onnx-int8"} != before_the_field
