"""The CLI as a new user meets it, each case a real `cxr-triage` process: one line on stderr naming the
variable or file at fault and a non-zero exit status, never a traceback; --version; help with defaults on
every command; progress on the long commands; import refusing to overwrite; calibrate's small-split warning."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA, free_port

CHEST = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"


def run(tmp_path: Path, *argv: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "CXR_TRIAGE_DATA_DIR": str(tmp_path / "var"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cxr_triage.cli", *argv], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cxr-triage")]
    assert lines, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


@pytest.fixture(scope="module")
def tampered_model(tmp_path_factory):
    import cxr_model

    model = tmp_path_factory.mktemp("model") / "tampered"
    shutil.copytree(cxr_model.bundled_demo_path(), model)
    weights = model / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    return model


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    one_line_error(run(tmp_path, "worker", env={"CXR_TRIAGE_MODEL_PATH": str(missing)}),
                   str(missing), "CXR_TRIAGE_MODEL_PATH", "does not exist")
    one_line_error(run(tmp_path, "predict", "--model", str(missing), str(CHEST)), str(missing), "--model")


def test_tampered_model_directory(tmp_path, tampered_model):
    one_line_error(run(tmp_path, "worker", env={"CXR_TRIAGE_MODEL_PATH": str(tampered_model)}),
                   "weights.pt does not match the SHA-256", "CXR_TRIAGE_MODEL_PATH")
    one_line_error(run(tmp_path, "predict", "--model", str(tampered_model), str(CHEST)), "does not match the SHA-256")


def test_unreachable_database_names_the_variable_and_hides_the_password(tmp_path):
    url = f"postgresql+psycopg2://cxr:Secret-8812@127.0.0.1:{free_port()}/cxr"
    for command in (["db", "upgrade"], ["user", "list"], ["node"], ["api"]):
        err = one_line_error(run(tmp_path, *command, env={"CXR_TRIAGE_DATABASE_URL": url,
                                                          "CXR_TRIAGE_DICOM_PORT": str(free_port()),
                                                          "CXR_TRIAGE_NODE_METRICS_PORT": "0",
                                                          "CXR_TRIAGE_API_PORT": str(free_port())}),
                             "CXR_TRIAGE_DATABASE_URL", "cxr:***@127.0.0.1")
        assert "Secret-8812" not in err


def test_a_postgres_scheme_url_is_refused_with_the_right_form(tmp_path):
    one_line_error(run(tmp_path, "db", "upgrade", env={"CXR_TRIAGE_DATABASE_URL": "postgres://cxr:Secret-8812@db/x"}),
                   "CXR_TRIAGE_DATABASE_URL", "postgresql+psycopg2://")


def test_a_port_in_use_is_named_with_its_variable(tmp_path):
    assert run(tmp_path, "db", "upgrade").returncode == 0
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        one_line_error(run(tmp_path, "node", env={"CXR_TRIAGE_DICOM_HOST": "127.0.0.1", "CXR_TRIAGE_DICOM_PORT": port}),
                       f"port {port} on 127.0.0.1 (CXR_TRIAGE_DICOM_PORT) is in use")
        one_line_error(run(tmp_path, "api", env={"CXR_TRIAGE_API_PORT": port}),
                       f"port {port} on 127.0.0.1 (CXR_TRIAGE_API_PORT) is in use")
        one_line_error(run(tmp_path, "node", env={"CXR_TRIAGE_DICOM_HOST": "127.0.0.1",
                                                  "CXR_TRIAGE_DICOM_PORT": str(free_port()),
                                                  "CXR_TRIAGE_NODE_METRICS_PORT": port}),
                       f"metrics port {port} on 127.0.0.1 (CXR_TRIAGE_NODE_METRICS_PORT) is in use")


def test_bad_and_misspelt_variables(tmp_path):
    one_line_error(run(tmp_path, "db", "upgrade", env={"CXR_TRIAGE_LOG_LEVEL": "verbose"}),
                   "CXR_TRIAGE_LOG_LEVEL=verbose", "not a log level")
    err = one_line_error(run(tmp_path, "db", "upgrade", env={"CXR_TRIAGE_DICOM_PORT": "eleven"}),
                         "CXR_TRIAGE_DICOM_PORT=eleven")
    assert "dicom_port" not in err
    ok = run(tmp_path, "model", "info", env={"CXR_TRIAGE_DICOM_PROT": "104"})
    assert ok.returncode == 0
    assert ("warning: CXR_TRIAGE_DICOM_PROT is not a setting and is ignored; did you mean CXR_TRIAGE_DICOM_PORT?"
            in ok.stderr)


def test_a_dot_env_here_is_not_read_unless_named(tmp_path):
    (tmp_path / ".env").write_text("CXR_TRIAGE_EXPORT_DESTINATIONS=PACS@pacs.hospital.example:104\n")
    quiet = run(tmp_path, "db", "upgrade")
    assert quiet.returncode == 0 and "./.env is not read; set CXR_TRIAGE_ENV_FILE=.env" in quiet.stderr
    (tmp_path / ".env").write_text("CXR_TRIAGE_EXPORT_DESTINATIONS=not-a-destination\n")
    one_line_error(run(tmp_path, "db", "upgrade", env={"CXR_TRIAGE_ENV_FILE": ".env"}),
                   "CXR_TRIAGE_EXPORT_DESTINATIONS=not-a-destination")


def test_demo_with_the_api_down(tmp_path):
    err = run(tmp_path, "demo", "--timeout", "5", env={"CXR_TRIAGE_API_PORT": str(free_port())})
    assert err.returncode != 0 and "Traceback" not in err.stderr
    assert "does not answer" in err.stderr and "CXR_TRIAGE_API_PORT" in err.stderr


def test_predict_exits_non_zero_on_what_is_not_an_image(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(os.urandom(4096))
    folder = tmp_path / "folder"
    folder.mkdir()
    for bad in (text, noise, folder):
        result = run(tmp_path, "predict", str(bad), env={"CXR_TRIAGE_MODEL_RUNTIME": "torch"})
        one_line_error(result, str(bad), status=1)
    fine = run(tmp_path, "predict", "--progress", str(CHEST), str(CHEST), env={"CXR_TRIAGE_MODEL_RUNTIME": "torch"})
    assert fine.returncode == 0, fine.stderr
    assert "predict: 2/2 (100%)" in fine.stderr  # progress on stderr with --progress (no terminal here)
    assert "predict:" not in run(tmp_path, "predict", str(CHEST), env={"CXR_TRIAGE_MODEL_RUNTIME": "torch"}).stderr


def test_version_and_help_with_defaults_on_every_command(tmp_path):
    from cxr_triage.cli import _parser
    from cxr_triage.runtime import package_version

    version = run(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"cxr-triage {package_version()}"

    def commands(parser, prefix=()):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    yield (*prefix, name), sub
                    yield from commands(sub, (*prefix, name))

    found = dict(commands(_parser()))
    assert {("serve",), ("node",), ("worker",), ("api",), ("predict",), ("model", "import"), ("health",)} <= set(found)
    for path, parser in found.items():
        assert parser.description, path
        for action in parser._actions:
            if action.dest not in ("help",) and action.help is None:
                pytest.fail(f"{' '.join(path)}: {action.option_strings or action.dest} has no help")
    for path in [("serve",), ("node",), ("worker",), ("api",), ("predict",), ("model", "import"),
                 ("model", "calibrate")]:
        result = run(tmp_path, *path, "--help")
        assert result.returncode == 0 and result.stdout, path
        assert "default:" in result.stdout, path
    assert "CXR_TRIAGE_DICOM_PORT" in run(tmp_path, "node", "--help").stdout


def test_model_import_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model_card.json").write_text("{}")
    one_line_error(run(tmp_path, "model", "import", "--from", "torchvision", str(tmp_path / "ckpt.pt"), str(out)),
                   f"{out} already holds files", "--force")
    forced = run(tmp_path, "model", "import", "--from", "torchvision", str(tmp_path / "ckpt.pt"), str(out), "--force")
    one_line_error(forced, "checkpoint not found")  # past the refusal, to the checkpoint itself
    assert (out / "model_card.json").read_text() == "{}"


def test_calibrate_warns_on_a_split_too_small_and_shows_progress(tmp_path):
    import cxr_model

    data, model = tmp_path / "data", tmp_path / "model"
    assert run(tmp_path, "model", "make-phantoms", str(data), "--n", "40", "--size", "32").returncode == 0
    shutil.copytree(cxr_model.bundled_demo_path(), model)
    result = run(tmp_path, "model", "calibrate", "--model", str(model), "--dataset", "chestxray14", "--data-dir",
                 str(data), "--split", "val", "--specificity", "0.95", "--progress", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "cxr-triage model calibrate: warning:" in result.stderr
    assert "for specificity 0.95" in result.stderr and "not to be trusted" in result.stderr
    assert "calibrate val: " in result.stderr and "(100%)" in result.stderr
    card = cxr_model.load_card(model)
    assert card.evaluation["calibration"]["warnings"]
