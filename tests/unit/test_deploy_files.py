"""The image's Dockerfile and `make image`, read as text (no container engine runs here).

`make image` builds it where docker, podman or buildah works; these checks
hold the Dockerfile to what the docs promise: multi-stage, non-root, every
Python package from a lock file with hashes, OCI labels, and the same paths
and ports as the Helm chart and `warden inject`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from warden.cli_inject import sidecar_template
from warden.config import DEFAULT_ADMIN_LISTEN, DEFAULT_PROXY_LISTEN, parse_listen

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


STEPS = instructions(DOCKERFILE.read_text())


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for step in STEPS:
        if step[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(step)
    return found


def test_multi_stage_and_the_final_stage_runs_as_non_root() -> None:
    build, final = stages()
    assert build[0][1].endswith("AS build")
    assert any(op == "COPY" and args.startswith("--from=build") for op, args in final)
    users = [args for op, args in final if op == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    assert int(uid) == sidecar_template()["securityContext"]["runAsUser"]
    # No pip, compiler or source tree in the final stage: only the built venv.
    assert not any(op == "RUN" and "pip " in args for op, args in final)


def test_every_package_comes_from_a_lock_with_hashes() -> None:
    build, _ = stages()
    installs = [
        cmd.strip()
        for op, args in build
        if op == "RUN"
        for cmd in args.split("&&")
        if "pip install" in cmd
    ]
    assert any("--require-hashes" in c and "-r requirements.lock" in c for c in installs)
    for cmd in installs:
        # The only install without hashes is Warden's own wheel, built just above.
        assert "--require-hashes" in cmd or cmd.endswith("/wheels/*.whl"), cmd
        assert "--no-deps" in cmd, cmd  # nothing resolved outside the lock


def test_the_build_lock_step_yields_setuptools_pinned_with_hashes(tmp_path: Path) -> None:
    (step,) = [a for op, a in STEPS if op == "RUN" and "build.lock" in a]
    sed = step.split("&&")[0].strip()
    assert sed.startswith("sed ")
    assert sed.endswith("> build.lock")
    argv = shlex.split(sed.removesuffix("> build.lock"))
    out = subprocess.run(
        [*argv], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert re.fullmatch(r"setuptools==[0-9.]+ \\", lines[0])
    assert lines[1:]
    assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", ln) for ln in lines[1:])


def test_the_wheel_build_gets_what_setup_py_reads() -> None:
    # setup.py copies the shipped bundle into the wheel; without it in the
    # build context the image would start with no policy and never be ready.
    build, _ = stages()
    copied = " ".join(args for op, args in build if op == "COPY")
    needed = ("pyproject.toml", "setup.py", "README.md", "src", "policies/customer-support")
    # ...and its eval suite, which `warden init` writes beside the bundle.
    for path in (*needed, "policies/customer-support-evals"):
        assert path in copied.split(), path
    setup_py = (ROOT / "setup.py").read_text()
    assert '"policies" / "customer-support"' in setup_py


def test_oci_labels() -> None:
    _, final = stages()
    labels = " ".join(args for op, args in final if op == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${REVISION}"' in labels


def test_paths_and_ports_match_the_chart_and_inject() -> None:
    _, final = stages()
    container = sidecar_template()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (workdir,) = [a for op, a in final if op == "WORKDIR"]
    # `warden serve`'s relative defaults (./warden-data/...) land on the data volume.
    assert workdir == mounts["warden-data"]
    exposed = {int(p) for op, a in final if op == "EXPOSE" for p in a.split()}
    ports = {p["containerPort"] for p in container["ports"]}
    assert (
        exposed
        == ports
        == {parse_listen(DEFAULT_PROXY_LISTEN)[1], parse_listen(DEFAULT_ADMIN_LISTEN)[1]}
    )
    (entrypoint,) = [a for op, a in final if op == "ENTRYPOINT"]
    assert entrypoint == '["warden", "serve"]'
    assert container["args"] == ["--config", mounts["warden-config"] + "/warden.yaml"]


def test_make_image_builds_this_dockerfile_with_any_engine() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nimage:", 1)[1].split("\n\n", 1)[0]
    assert "-f deploy/Dockerfile" in recipe
    for engine in ("docker", "podman", "buildah"):
        assert engine in recipe
    assert "SOURCE_DATE_EPOCH" in recipe
    assert "--build-arg REVISION=" in recipe
