import pytest

from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError
from next_speed.data.sentences import SentencesConfig
from next_speed.quant.rvq import RVQConfig
from next_speed.training.train_planner import PlannerTrainConfig


def test_defaults_env_then_cli():
    assert resolve(RVQConfig, environ={}).k == 6
    assert resolve(RVQConfig, environ={"K": "4"}).k == 4
    assert resolve(RVQConfig, {"k": "2"}, environ={"K": "4"}).k == 2
    assert resolve(RVQConfig, environ={}, base={"k": 3}).k == 3
    assert resolve(RVQConfig, environ={"K": "5"}, base={"k": 3}).k == 5


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"K": "0"}, "K=0"),
        ({"V": "1"}, "V=1"),
        ({"K": "abc"}, "K='abc'"),
        ({"NITER": "-1"}, "NITER"),
    ],
)
def test_invalid_values_name_the_knob(env, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(RVQConfig, environ=env)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown option 'kk'.*valid options"):
        resolve(RVQConfig, {"kk": 1}, environ={})


def test_cross_knob_rules():
    with pytest.raises(ConfigError, match="MIN_LEN=50 is larger than MAX_LEN=10"):
        resolve(SentencesConfig, environ={"MIN_LEN": "50", "MAX_LEN": "10"})
    with pytest.raises(ConfigError, match="D_MODEL=30 is not divisible by N_HEADS=4"):
        resolve(PlannerTrainConfig, environ={"D_MODEL": "30"})


def test_lang_reads_locales_and_hf_dataset_implies_hf():
    assert resolve(SentencesConfig, environ={"LANG": "C.UTF-8"}).lang == "en"
    assert resolve(SentencesConfig, environ={"LANG": "de_DE.UTF-8"}).lang == "de"
    assert resolve(SentencesConfig, environ={}).corpus == "wiki"
    assert resolve(SentencesConfig, environ={"HF_DATASET": "wikitext"}).corpus == "hf"
    # HF_CONFIG or HF_SPLIT alone means the hub too; an HF_* knob beside another corpus is refused, never ignored
    assert resolve(SentencesConfig, environ={"HF_CONFIG": "wikitext-103-raw-v1"}).corpus == "hf"
    assert resolve(SentencesConfig, environ={"HF_SPLIT": "validation"}).corpus == "hf"
    with pytest.raises(ConfigError, match="HF_DATASET is set but CORPUS=sotu"):
        resolve(SentencesConfig, environ={"HF_DATASET": "x", "CORPUS": "sotu"})


def test_numbers_are_finite_and_typed():
    """NaN passes `v < min` and `v > max` (both false): refused at parsing, as are infinity, a
    boolean given for a number, a fraction for a count and a seed past 32 bits."""
    from next_speed.generation.generate import GenerateConfig

    for env, knob in (
        ({"TEMP": "nan"}, "TEMP"),
        ({"TOP_P": "inf"}, "TOP_P"),
        ({"TEMP": "-Infinity"}, "TEMP"),
        ({"SEED": str(2**64)}, "SEED"),
        ({"SEED": "-1"}, "SEED"),
    ):
        with pytest.raises(ConfigError, match=knob):
            resolve(GenerateConfig, environ=env)
    for cli, knob in (({"n_cand": True}, "N_CAND"), ({"n_cand": 2.5}, "N_CAND"), ({"temp": float("nan")}, "TEMP")):
        with pytest.raises(ConfigError, match=knob):
            resolve(GenerateConfig, cli)
    assert resolve(GenerateConfig, {"temp": 1, "seed": 2**32 - 1}).temp == 1


def test_bool_parsing():
    assert resolve(PlannerTrainConfig, environ={"DETERMINISTIC": "0"}).deterministic is False
    with pytest.raises(ConfigError, match="DETERMINISTIC='maybe'"):
        resolve(PlannerTrainConfig, environ={"DETERMINISTIC": "maybe"})


def test_a_bare_boolean_flag_means_on():
    import argparse

    from next_speed.core.config import add_arguments, from_namespace, resolve
    from next_speed.pipeline import RunConfig

    def parse(*argv):
        ap = argparse.ArgumentParser()
        add_arguments(ap, RunConfig)
        return resolve(RunConfig, from_namespace(ap.parse_args(argv), RunConfig), environ={})

    assert parse("--force").force is True
    assert parse("--force", "0").force is False and parse().force is False
    assert parse("--force", "--preset", "tiny").preset == "tiny"
