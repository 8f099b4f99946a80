from pathlib import Path

import pytest

from aimass.core.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("AIMASS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_live_under_home(tmp_path):
    settings = load_settings(home=tmp_path / "h")
    assert settings.database_url == f"sqlite:///{tmp_path / 'h' / 'aimass.db'}"
    assert settings.artifact_root == (tmp_path / "h" / "artifacts").as_uri()
    assert settings.nats_url == f"nats://127.0.0.1:{settings.ports.nats}"
    assert settings.ports.nats != 4222


def test_env_overrides_yaml_and_nested_keys(monkeypatch, tmp_path):
    config = tmp_path / "aimass.yaml"
    config.write_text("ports:\n  registry: 7001\n  data: 7002\nlog_level: DEBUG\n")
    monkeypatch.setenv("AIMASS_CONFIG", str(config))
    monkeypatch.setenv("AIMASS_PORTS__REGISTRY", "7100")
    settings = load_settings()
    assert settings.ports.registry == 7100
    assert settings.ports.data == 7002
    assert settings.log_level == "DEBUG"
    assert settings.service_address("registry") == "127.0.0.1:7100"


def test_yaml_in_home_is_read_without_aimass_config(monkeypatch, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.yaml").write_text("shutdown_grace_s: 3\n")
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    assert load_settings().shutdown_grace_s == 3


def test_bad_port_names_the_variable(monkeypatch):
    monkeypatch.setenv("AIMASS_PORTS__REGISTRY", "notaport")
    with pytest.raises(SettingsError, match=r"AIMASS_PORTS__REGISTRY: .*'notaport'"):
        load_settings()


def test_out_of_range_port_is_refused():
    with pytest.raises(SettingsError, match="AIMASS_PORTS__DATA"):
        load_settings(ports={"data": 70000})


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("database_url", "mysql://x", "sqlite:// or postgresql://"),
        ("artifact_root", "ftp://x", "file:// or s3://"),
        ("nats_url", "http://x", "nats://host:port"),
        ("log_level", "LOUD", "AIMASS_LOG_LEVEL"),
    ],
)
def test_invalid_values_say_what_is_wrong(key, value, problem):
    with pytest.raises(SettingsError, match=problem):
        load_settings(**{key: value})


def test_unknown_key_in_yaml_is_an_error(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("portz: {}\n")
    monkeypatch.setenv("AIMASS_CONFIG", str(config))
    with pytest.raises(SettingsError, match="AIMASS_PORTZ"):
        load_settings()


def test_missing_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMASS_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(SettingsError, match=r"nope\.yaml does not exist"):
        load_settings()


def test_yaml_that_is_not_a_mapping(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("- a\n- b\n")
    monkeypatch.setenv("AIMASS_CONFIG", str(config))
    with pytest.raises(SettingsError, match="mapping"):
        load_settings()


def test_unknown_service_port_lookup():
    with pytest.raises(KeyError, match="nosuch"):
        load_settings().ports.of("nosuch")


def test_home_is_made_absolute(tmp_path):
    assert load_settings(home=Path("rel")).home == tmp_path / "rel"
