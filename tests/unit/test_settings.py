"""Every CXR_TRIAGE_* name of DESIGN.md section 3 is read from the environment and validated."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from triage_core.settings import Destination, Settings

DESIGN_VARIABLES = {
    "CXR_TRIAGE_DATA_DIR": ("data_dir", "{tmp}/elsewhere"),
    "CXR_TRIAGE_DATABASE_URL": ("database_url", "postgresql+psycopg2://u@127.0.0.1:5432/x"),
    "CXR_TRIAGE_BROKER_URL": ("broker_url", "redis://127.0.0.1:6379/3"),
    "CXR_TRIAGE_AE_TITLE": ("ae_title", "SITE_B"),
    "CXR_TRIAGE_DICOM_PORT": ("dicom_port", "11113"),
    "CXR_TRIAGE_ALLOWED_CALLING_AETS": ("allowed_calling_aets", "PACS1, MODALITY2"),
    "CXR_TRIAGE_EXPORT_DESTINATIONS": ("export_destinations", "PACS@10.0.0.5:104,ARCHIVE@archive.local:11112"),
    "CXR_TRIAGE_SERIES_QUIET_SECONDS": ("series_quiet_seconds", "2.5"),
    "CXR_TRIAGE_API_HOST": ("api_host", "0.0.0.0"),
    "CXR_TRIAGE_API_PORT": ("api_port", "8001"),
    "CXR_TRIAGE_MODEL_PATH": ("model_path", "{tmp}/model"),
}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(__import__("os").environ):
        if name.startswith("CXR_TRIAGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_are_the_embedded_ones(clean_env, tmp_path):
    settings = Settings()
    assert settings.data_dir == (tmp_path / "var").resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'var' / 'triage.sqlite'}"
    assert settings.broker_url.startswith("sqla+sqlite:///") and settings.uses_embedded_broker
    assert (settings.ae_title, settings.dicom_port, settings.api_host, settings.api_port) == ("CXR_TRIAGE", 11112, "127.0.0.1", 8000)
    assert settings.allowed_calling_aets == [] and settings.export_destinations == []
    assert settings.series_quiet_seconds == 5.0 and settings.model_path is None


def test_every_design_variable_takes_effect(clean_env, tmp_path):
    for name, (_, raw) in DESIGN_VARIABLES.items():
        clean_env.setenv(name, raw.format(tmp=tmp_path))
    settings = Settings()
    assert settings.data_dir == tmp_path / "elsewhere"
    assert settings.database_url == "postgresql+psycopg2://u@127.0.0.1:5432/x"
    assert settings.broker_url == "redis://127.0.0.1:6379/3" and not settings.uses_embedded_broker
    assert settings.ae_title == "SITE_B" and settings.dicom_port == 11113
    assert settings.allowed_calling_aets == ["PACS1", "MODALITY2"]
    assert settings.export_destinations == [Destination("PACS", "10.0.0.5", 104), Destination("ARCHIVE", "archive.local", 11112)]
    assert settings.series_quiet_seconds == 2.5
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 8001)
    assert settings.model_path == Path(f"{tmp_path}/model")


def test_env_file_is_read_only_when_named(clean_env, tmp_path):
    """A production .env left in the working directory must not configure a later local run."""
    (tmp_path / ".env").write_text("CXR_TRIAGE_AE_TITLE=FROM_DOTENV\nCXR_TRIAGE_DICOM_PORT=4242\n")
    assert (Settings().ae_title, Settings().dicom_port) == ("CXR_TRIAGE", 11112)
    clean_env.setenv("CXR_TRIAGE_ENV_FILE", str(tmp_path / ".env"))
    settings = Settings()
    assert (settings.ae_title, settings.dicom_port) == ("FROM_DOTENV", 4242)
    clean_env.setenv("CXR_TRIAGE_DICOM_PORT", "4343")  # the environment wins over the file
    assert Settings().dicom_port == 4343


def test_a_named_env_file_that_is_missing_is_an_error(clean_env, tmp_path):
    from triage_core.settings import SettingsError, load_settings

    clean_env.setenv("CXR_TRIAGE_ENV_FILE", str(tmp_path / "nowhere.env"))
    with pytest.raises(SettingsError, match="CXR_TRIAGE_ENV_FILE=.*no such file"):
        load_settings()


def test_bad_values_are_named_by_their_variable_and_secrets_are_not_repeated(clean_env):
    from triage_core.settings import SettingsError, load_settings

    clean_env.setenv("CXR_TRIAGE_DICOM_PORT", "eleven")
    clean_env.setenv("CXR_TRIAGE_DATABASE_URL", "mysql+nodriver://u:s3cr3t-value@db/x")
    with pytest.raises(SettingsError) as error:
        load_settings()
    text = str(error.value)
    assert "CXR_TRIAGE_DICOM_PORT=eleven" in text and "dicom_port" not in text
    assert "CXR_TRIAGE_DATABASE_URL" in text and "s3cr3t-value" not in text


def test_misspelt_variables_are_found_with_a_suggestion():
    from triage_core.settings import unknown_variables

    found = dict(unknown_variables({"CXR_TRIAGE_DICOM_PROT": "1", "CXR_TRIAGE_AE_TITLE": "X",
                                    "CXR_TRIAGE_ENV_FILE": "", "CXR_TRIAGE_ZZZ": "1", "OTHER": "1"}))
    assert found == {"CXR_TRIAGE_DICOM_PROT": "CXR_TRIAGE_DICOM_PORT", "CXR_TRIAGE_ZZZ": None}


def test_empty_model_path_means_the_bundled_model(clean_env):
    clean_env.setenv("CXR_TRIAGE_MODEL_PATH", "")
    assert Settings().model_path is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CXR_TRIAGE_EXPORT_DESTINATIONS", "PACS:104", "not AET@host:port"),
        ("CXR_TRIAGE_EXPORT_DESTINATIONS", "PACS@host:70000", "port out of range"),
        ("CXR_TRIAGE_AE_TITLE", "A_TITLE_LONGER_THAN_16", "invalid AE title"),
        ("CXR_TRIAGE_ALLOWED_CALLING_AETS", "OK,BAD\\AET", "invalid AE title"),
        ("CXR_TRIAGE_DICOM_PORT", "0", "greater than or equal to 1"),
        ("CXR_TRIAGE_SERIES_QUIET_SECONDS", "-1", "greater than or equal to 0"),
        ("CXR_TRIAGE_MODEL_RUNTIME", "tensorrt", "auto, torch, onnx or onnx-int8"),
        ("CXR_TRIAGE_MAX_PDU_SIZE", "0", "greater than or equal to 65536"),
        ("CXR_TRIAGE_MAX_DATASET_SIZE", "4294967296", "less than or equal to 2147483647"),
        ("CXR_TRIAGE_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-net", "not an address or CIDR network"),
        ("CXR_TRIAGE_DICOM_TLS_PORT", "2762", "needs tls_cert_file and tls_key_file"),
        ("CXR_TRIAGE_TLS_VERIFY_CLIENTS", "true", "needs tls_ca_file"),
        ("CXR_TRIAGE_DICOM_TLS_ONLY", "true", "needs dicom_tls_port"),
        ("CXR_TRIAGE_EXPORT_DESTINATIONS", "PACS@h:104?tls&verify=no", "unknown option(s) verify"),
        ("CXR_TRIAGE_MOVE_DESTINATIONS", "PACS", "not AET@host:port"),
        ("CXR_TRIAGE_LOG_LEVEL", "verbose", "not a log level"),
        ("CXR_TRIAGE_LOG_FORMAT", "xml", "json"),
        ("CXR_TRIAGE_DATABASE_URL", "postgres://u:x9f2@db/x", "postgresql+psycopg2://"),
        ("CXR_TRIAGE_DATABASE_URL", "oracle+nothing://u:x9f2@db/x", "unknown database driver"),
        ("CXR_TRIAGE_STORAGE_URL", "s3:/bucket", "s3://bucket"),
    ],
)
def test_bad_values_stop_start_up_with_a_message(clean_env, name, value, message):
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    assert message in str(error.value)


def test_cli_reports_bad_configuration_without_a_traceback(clean_env, capsys):
    from cxr_triage.cli import main

    clean_env.setenv("CXR_TRIAGE_EXPORT_DESTINATIONS", "nonsense")
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert "bad configuration: CXR_TRIAGE_EXPORT_DESTINATIONS=nonsense" in err and "AET@host:port" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("env", "cores", "gpu", "expected"),
    [
        ({}, 2, False, (2, 1)),  # one single-threaded model process per core (bench/model_bench.py)
        ({}, 1, False, (1, 1)),
        ({}, 64, False, (8, 8)),  # capped: every process holds a model
        ({}, 16, True, (1, None)),  # one process feeds the GPU
        ({"CXR_TRIAGE_WORKER_CONCURRENCY": "1"}, 4, False, (1, 4)),
        ({"CXR_TRIAGE_WORKER_CONCURRENCY": "3", "CXR_TRIAGE_MODEL_THREADS": "2"}, 2, False, (3, 2)),
        ({"CXR_TRIAGE_MODEL_DEVICE": "cuda:1"}, 8, None, (1, None)),
        ({"CXR_TRIAGE_MODEL_DEVICE": "cpu"}, 2, None, (2, 1)),
    ],
)
def test_worker_plan_follows_the_settings_then_the_machine(clean_env, env, cores, gpu, expected):
    from cxr_triage.runtime import worker_plan

    for name, value in env.items():
        clean_env.setenv(name, value)
    plan = worker_plan(Settings(), cores=cores, gpu=gpu)
    assert (plan.concurrency, plan.threads) == expected


def test_model_runtime_names(clean_env):
    for name in ("auto", "torch", "onnx", "onnx-int8"):
        clean_env.setenv("CXR_TRIAGE_MODEL_RUNTIME", name)
        assert Settings().model_runtime == name


def test_dicom_edge_defaults_are_bounded(clean_env):
    settings = Settings()
    assert settings.dicom_read_timeout == 10.0 and settings.dicom_idle_timeout == 60.0
    assert settings.max_pdu_size == 4 * 2**20 and settings.max_dataset_size == 2**30
    assert (settings.max_associations, settings.max_associations_per_source) == (32, 8)
    assert settings.strict_called_ae_title is True
    assert settings.allowed_networks == [] and settings.dicom_tls_port is None and settings.move_destinations == []


def test_dicom_edge_variables_take_effect(clean_env, tmp_path):
    for name, value in {
        "CXR_TRIAGE_DICOM_READ_TIMEOUT": "3.5", "CXR_TRIAGE_MAX_ASSOCIATIONS_PER_SOURCE": "2",
        "CXR_TRIAGE_ALLOWED_NETWORKS": "10.1.0.0/16, 192.168.7.9", "CXR_TRIAGE_DICOM_TLS_PORT": "2762",
        "CXR_TRIAGE_TLS_CERT_FILE": str(tmp_path / "c.pem"), "CXR_TRIAGE_TLS_KEY_FILE": str(tmp_path / "k.pem"),
        "CXR_TRIAGE_MOVE_DESTINATIONS": "VIEWER@10.1.2.3:104", "CXR_TRIAGE_EXPORT_DESTINATIONS": "PACS@p:2762?tls",
        "CXR_TRIAGE_STRICT_CALLED_AE_TITLE": "false", "CXR_TRIAGE_DICOM_RECEIVERS": "3",
    }.items():
        clean_env.setenv(name, value)
    settings = Settings()
    assert settings.dicom_read_timeout == 3.5 and settings.max_associations_per_source == 2
    assert [str(n) for n in settings.allowed_network_objects] == ["10.1.0.0/16", "192.168.7.9/32"]
    assert settings.dicom_tls_port == 2762 and settings.strict_called_ae_title is False
    assert settings.dicom_receivers == 3
    assert sorted(settings.known_move_destinations) == ["PACS", "VIEWER"]
    assert settings.known_move_destinations["PACS"].tls is True


@pytest.mark.parametrize(("env", "cores", "expected"), [({}, 2, 2), ({}, 1, 1), ({}, 16, 4),
                                                         ({"CXR_TRIAGE_DICOM_RECEIVERS": "6"}, 2, 6)])
def test_receiving_processes_follow_the_setting_then_the_cores(clean_env, env, cores, expected):
    from dicom_node.processes import receiver_processes

    for name, value in env.items():
        clean_env.setenv(name, value)
    assert receiver_processes(Settings(), cores=cores) == expected
