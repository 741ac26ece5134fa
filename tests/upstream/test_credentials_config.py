"""``[backends.NAME.credential]`` in TOML: each type becomes the right object; every
mistake comes back naming the file, the key path and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastgw.config import ConfigError, load_config
from fastgw.config.model import CredentialConfig

LAMBDA = "https://abcdefghijklmnopqrstuvwxyz012345.lambda-url.eu-central-1.on.aws"


def config_with(tmp_path: Path, credential: str, endpoint: str = "https://fn.example") -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(
        '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
        f'[backends.fn]\nendpoints = ["{endpoint}"]\n'
        f"[backends.fn.credential]\n{credential}\n"
        '[[routes]]\nname = "all"\nbackend = "fn"\n'
    )
    return p


def credential(tmp_path: Path, text: str, endpoint: str = "https://fn.example") -> CredentialConfig:
    cfg = load_config(config_with(tmp_path, text, endpoint)).backends["fn"].credential
    assert cfg is not None
    return cfg


def problems(tmp_path: Path, text: str, endpoint: str = "https://fn.example") -> list[str]:
    path = config_with(tmp_path, text, endpoint)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    out = []
    for file, key, message in info.value.problems:
        assert file.endswith("gw.toml")
        out.append(f"{key}: {message}")
    return out


def test_each_type_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = credential(
        tmp_path,
        'type = "google_id_token"\nmetadata_url = "http://127.0.0.1:8080"\n'
        'header = "x-serverless-authorization"\naudience = "https://aud.example"',
    )
    assert (g.type, g.source, g.header, g.audience) == (
        "google_id_token",
        "metadata",
        "x-serverless-authorization",
        "https://aud.example",
    )
    key = tmp_path / "sa.json"
    key.write_text("{}")
    sa = credential(
        tmp_path, 'type = "google_id_token"\nsource = "service_account_file"\nkey_file = "sa.json"'
    )
    assert sa.key_file == str(key)
    aws = credential(tmp_path, 'type = "aws_sigv4"\nsource = "instance"', LAMBDA)
    assert (aws.source, aws.region, aws.service) == ("instance", None, "lambda")
    monkeypatch.setenv("FN_KEY", "k")
    assert (
        credential(tmp_path, 'type = "azure_function_key"\nkey_env = "FN_KEY"').key_env == "FN_KEY"
    )
    (tmp_path / "tok").write_text("t")
    assert credential(tmp_path, 'type = "bearer_file"\npath = "tok"').path == str(tmp_path / "tok")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('type = "kerberos"', 'backends.fn.credential.type: must be one of "google_id_token"'),
        ('source = "metadata"', "backends.fn.credential.type: missing (required)"),
        (
            'type = "google_id_token"\nsource = "service_account_file"',
            "backends.fn.credential.key_file: missing (required with source",
        ),
        (
            'type = "google_id_token"\nkey_file = "x.json"',
            'backends.fn.credential.key_file: key_file applies only to source = "service_acc',
        ),
        (
            'type = "google_id_token"\nmetadata_url = "http://metadata.example"',
            "backends.fn.credential.metadata_url: URL scheme must be https",
        ),
        (
            'type = "google_id_token"\nheader = "cookie"',
            "backends.fn.credential.header: must be one of",
        ),
        (
            'type = "google_id_token"\npath = "x"',
            "backends.fn.credential.path: unknown key",
        ),
        (
            'type = "aws_sigv4"\nsource = "instance"',
            "backends.fn.credential.region: missing: endpoint https://fn.example is not a "
            "Lambda function URL",
        ),
        (
            'type = "aws_sigv4"\nregion = "EU West"',
            "backends.fn.credential.region: must be an AWS region",
        ),
        (
            'type = "aws_sigv4"\nregion = "eu-west-1"\nsource = "env"\nprofile = "p"',
            'backends.fn.credential.profile: profile applies only to source = "default" or',
        ),
        (
            'type = "azure_function_key"',
            "backends.fn.credential.key_file: set exactly one of key_file and key_env",
        ),
        (
            'type = "azure_function_key"\nkey_env = "FASTGW_SURELY_UNSET_VAR"',
            "backends.fn.credential.key_env: environment variable FASTGW_SURELY_UNSET_VAR is not",
        ),
        (
            'type = "bearer_file"\npath = "missing.token"',
            "backends.fn.credential.path: file not found:",
        ),
        ('type = "bearer_file"', "backends.fn.credential.path: missing (required)"),
    ],
)
def test_mistakes_name_file_key_and_problem(tmp_path: Path, text: str, want: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(want) for p in found), found


def test_aws_env_source_needs_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    found = problems(tmp_path, 'type = "aws_sigv4"\nsource = "env"', LAMBDA)
    assert found == [
        'backends.fn.credential.source: source = "env" but AWS_ACCESS_KEY_ID is not set'
    ]
