"""Redaction: secret-named variables, their values and URL userinfo never reach a report, whatever they
hold."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labbench.measure.record import Event
from labbench.redact import MASK, is_secret, redact_env, redact_html, redact_text
from labbench.report import dashboard

SECRET = [
    "API_KEY",
    "GITHUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "CI_JOB_TOKEN",
    "SSH_KEY_PASSPHRASE",
    "CI_JOB_JWT_V2",
    "DB_PASSWORD",
    "MYSQL_PASSWD",
    "NPMTOKEN",
    "apiKey",
    "private_token",
    "access-token",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLIENT_SECRETS",
    "SIGNING_KEYS",
    "x.api_key",
]
PUBLIC = [
    "KEYBOARD",
    "MONKEY_PATCH",
    "KEYRING_BACKEND",
    "TOKENIZERS_PARALLELISM",
    "MAX_TOKENS",
    "SECRETARY",
    "PWD",
    "OLDPWD",
    "PATH",
    "HOME",
    "CI_REPOSITORY_URL",
    "CI_REGISTRY_USER",
    "GITLAB_USER_EMAIL",
    "SSH_AUTH_SOCK",
    "Python",
    "Packages",
    "PASSED_COUNT",
]


@pytest.mark.parametrize("name", SECRET)
def test_secret_names(name):
    assert is_secret(name, [])


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names(name):
    assert not is_secret(name, [])


def test_extra_patterns_from_the_argument_or_the_environment(monkeypatch):
    assert not is_secret("SENTRY_DSN", [])
    assert is_secret("sentry_dsn", ["*_DSN"])
    monkeypatch.setenv("LABBENCH_REDACT", " *_dsn , LAB_PIN")
    assert is_secret("SENTRY_DSN") and is_secret("LAB_PIN") and not is_secret("LAB_PINS")
    assert redact_env({"SENTRY_DSN": "x", "HOME": "/root"}) == {"SENTRY_DSN": MASK, "HOME": "/root"}
    assert redact_env({"SENTRY_DSN": "x"}, patterns=[]) == {"SENTRY_DSN": "x"}  # the argument replaces them


def test_environment_table():
    env = {
        "GITHUB_TOKEN": "ghp_abc",
        "CI_JOB_TOKEN": "",
        "HOME": "/root",
        "CI_JOB_ID": 7,
        "CI_REPOSITORY_URL": "https://gitlab-ci-token:glcbt-64_secret@gitlab.example.com/lab/bench.git",
        "Packages": {"pytest": "9.2.0", "DEPLOY_KEY": "k"},
        "Args": ["--x", "https://tok@h/p"],
    }
    assert redact_env(env, []) == {
        "GITHUB_TOKEN": MASK,
        "CI_JOB_TOKEN": MASK,
        "HOME": "/root",
        "CI_JOB_ID": 7,
        "CI_REPOSITORY_URL": "https://***@gitlab.example.com/lab/bench.git",
        "Packages": {"pytest": "9.2.0", "DEPLOY_KEY": MASK},
        "Args": ["--x", "https://***@h/p"],
    }


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "clone https://oauth2:glpat-XyZ@gitlab.com/a/b.git failed",
            "clone https://***@gitlab.com/a/b.git failed",
        ),
        ("https://ghp_tok@github.com/o/r", "https://***@github.com/o/r"),
        ("git+ssh://git@github.com/o/r.git", "git+ssh://***@github.com/o/r.git"),
        (
            "GET https://api.example.com/v4/jobs?private_token=abc123&scope=x",
            "GET https://api.example.com/v4/jobs?private_token=***&scope=x",
        ),
        (
            "env GITHUB_TOKEN=ghp_1 AWS_REGION=eu-west-1 tool --api-key=k1 --baud=921600",
            "env GITHUB_TOKEN=*** AWS_REGION=eu-west-1 tool --api-key=*** --baud=921600",
        ),
        (
            "rfc2217://127.0.0.1:14001 mail me@example.com at https://example.com/a@b",
            "rfc2217://127.0.0.1:14001 mail me@example.com at https://example.com/a@b",
        ),
        ("export GITHUB_TOKEN='ghp 1' DB_PASSWORD=\"p w\" x", "export GITHUB_TOKEN=*** DB_PASSWORD=*** x"),
        ("KEYBOARD=us TOKEN= accuracy=0.95", "KEYBOARD=us TOKEN= accuracy=0.95"),
    ],
)
def test_redact_text(text, redacted):
    assert redact_text(text, []) == redacted


# RFC 3986 userinfo (unreserved, percent-encoded and sub-delims characters and ":"), and a raw "@"
# as people paste passwords
USERINFO_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:%@"
userinfo = st.text(USERINFO_CHARS, min_size=1, max_size=40)
hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,2}(:[0-9]{1,5})?", fullmatch=True)
schemes = st.sampled_from(["https", "http", "ssh", "git+https", "rfc2217", "ftp", "s3"])
tails = st.sampled_from(["", "/", "/group/repo.git", "?ref=main", "#frag", "/a/b?x=1&y=2"])
surroundings = st.sampled_from([("", ""), ("clone ", " failed"), ('"', '"'), ("<a href='", "'>"), ("(", ")")])


@given(userinfo, schemes, hosts, tails, surroundings)
def test_no_generated_userinfo_survives(info, scheme, host, tail, around):
    url = f"{scheme}://{info}@{host}{tail}"
    out = redact_text(around[0] + url + around[1], [])
    assert out == f"{around[0]}{scheme}://***@{host}{tail}{around[1]}"


@given(userinfo, hosts, st.dictionaries(st.sampled_from(SECRET + PUBLIC), st.text(max_size=20), max_size=5))
def test_no_generated_secret_survives_redact_env(info, host, env):
    env = {**env, "CI_REPOSITORY_URL": f"https://{info}@{host}/r.git"}
    out = redact_env(env, [])
    assert out["CI_REPOSITORY_URL"] == f"https://***@{host}/r.git"
    assert all(out[name] == MASK for name in env if name in SECRET)


def test_secret_environment_values_are_masked_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("LAB_API_TOKEN", "tok-3141")
    monkeypatch.setenv("SENTRY_DSN", "https://dsn.example/42")
    monkeypatch.setenv("DEPLOY_KEY", "true")  # too short to tell from ordinary words: kept
    monkeypatch.setenv("RUNNER_NAME", "lab-runner-7")  # a public variable's value is no secret
    text = "token tok-3141, dsn https://dsn.example/42, verbose true on lab-runner-7"
    assert redact_text(text, []) == "token ***, dsn https://dsn.example/42, verbose true on lab-runner-7"
    assert redact_text(text, ["*_DSN"]) == "token ***, dsn ***, verbose true on lab-runner-7"
    assert redact_env({"CMD": ["curl", "-H", "Bearer tok-3141"]}, []) == {"CMD": ["curl", "-H", "Bearer ***"]}


@pytest.mark.parametrize(
    ("markup", "redacted"),
    [
        ("<td>export DB_PASSWORD=&quot;p w&quot; x</td>", "<td>export DB_PASSWORD=*** x</td>"),
        (
            "<a href='https://u:p@h/x?private_token=abc&amp;y=1'>clone https://u:p@h</a>",
            "<a href='https://***@h/x?private_token=***&amp;y=1'>clone https://***@h</a>",
        ),
        ('<p title="API_KEY=k1">a &lt;b&gt; &amp; c</p>', '<p title="API_KEY=***">a &lt;b&gt; &amp; c</p>'),
        (
            "<img alt='x' src='data:image/png;base64,AAAA/9Key=='><img src=data:image/png;base64,AB/apiKey==>",
            "<img alt='x' src='data:image/png;base64,AAAA/9Key=='><img src=data:image/png;base64,AB/apiKey==>",
        ),
        (
            "<style>td>th{color:#c33}</style><td style='color:#c33'>a'b\"c</td>",
            "<style>td>th{color:#c33}</style><td style='color:#c33'>a'b\"c</td>",
        ),
    ],
)
def test_redact_html(markup, redacted):
    assert redact_html(markup, []) == redacted


def test_the_dashboard_masks_journals_written_before_redaction(tmp_path):
    path = tmp_path / "old.jsonl"
    event = Event(
        kind="quarantine",
        board="pi",
        step="deploy",
        test="t.py::test_x[pi]",
        error="SshError: pi: deploy: git clone https://ci:s3cr3t@git.example/lab.git failed",
    )
    path.write_text(event.model_dump_json() + "\n")
    text = dashboard.build([path], tmp_path / "index.html").read_text()
    assert "s3cr3t" not in text and "git clone https://***@git.example/lab.git failed" in text
