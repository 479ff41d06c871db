"""The images' inputs, without building them: package sections, Dockerfiles, per-image requirements, the
agent entrypoint's choice of kernel headers, the generic header tree, the seccomp profile.

Building and running the images is tests/test_kubelet.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flowmon_agent.kernel.preflight import Cause
from tests.schemas import REPO

IMAGES = REPO / "images"
PACKAGES = REPO / "scripts" / "apt-packages.txt"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))


# --- Debian packages -------------------------------------------------------------------------------------
def apt_sections(*sections: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(IMAGES / "apt-install.sh"), "--print", str(PACKAGES), *sections],
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_package_sections_cover_the_whole_list():
    """setup.sh installs every line; the sections split the same lines, each package exactly once."""
    sections = re.findall(r"^## section: (\S+)", PACKAGES.read_text(), re.MULTILINE)
    assert sections == ["base", "agent", "operator", "test", "images"]
    lines = [line.strip() for line in PACKAGES.read_text().splitlines()]
    listed = apt_sections(*sections).stdout.split()
    assert sorted(listed) == sorted(x for x in lines if x and not x.startswith("#"))
    assert len(set(listed)) == len(listed)
    # the agent image runs BCC and `ip`, never the tools the tests and benchmarks use
    assert set(apt_sections("agent").stdout.split()) == {"python3-bpfcc", "iproute2", "xz-utils"}
    assert apt_sections("nope").returncode == 3


# --- Dockerfiles -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_references_exist(dockerfile):
    text = dockerfile.read_text()
    assert text.startswith("#") and re.findall(r"^FROM (\S+)", text, re.MULTILINE)[-1] == "debian:12-slim"
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    for sections in re.findall(r"^RUN sh /tmp/build/apt-install\.sh \S+ (.+?)(?: &&|$)", text, re.MULTILINE):
        result = apt_sections(*sections.split())
        assert result.returncode == 0 and result.stdout.split(), (sections, result.stderr)


def final_stage(dockerfile: Path) -> str:
    return dockerfile.read_text().rsplit("\nFROM ", 1)[1]


def test_each_image_holds_only_its_packages():
    """The agent image: contract + kube + agent (+ bpf/); the operator image: contract + kube + operator.
    Never the CLI, the lab or pip in the final stage (pip is uninstalled in the venv stage)."""
    agent, operator = final_stage(IMAGES / "agent.Dockerfile"), final_stage(IMAGES / "operator.Dockerfile")
    pattern = r"^COPY (?:contract|kube|agent|operator|cli|lab)/(\w+)"
    copied = {name: set(re.findall(pattern, stage, re.MULTILINE))
              for name, stage in (("agent", agent), ("operator", operator))}  # fmt: skip
    assert copied == {
        "agent": {"flowmon_contract", "flowmon_kube", "flowmon_agent"},
        "operator": {"flowmon_contract", "flowmon_kube", "flowmon_operator"},
    }
    for dockerfile in DOCKERFILES:
        assert "pip uninstall -q -y pip setuptools" in dockerfile.read_text()
        assert "pip" not in final_stage(dockerfile)
    assert 'ENTRYPOINT ["/usr/local/bin/flowmon-agent-entrypoint", "/opt/flowmon/bin/python", "-m", ' in agent
    assert 'ENTRYPOINT ["/opt/flowmon/bin/python", "-m", "flowmon_operator"]' in operator
    assert "USER 65532:65532" in operator  # the operator Deployment's runAsUser


# Import name -> distribution name, where they differ; bcc comes from Debian (python3-bpfcc).
DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "prometheus_client": "prometheus-client",
    "pydantic_settings": "pydantic-settings",
}
FROM_DEBIAN = {"bcc"}


def third_party_imports(*packages: str) -> tuple[set[str], set[str]]:
    """(third-party top-level modules, flowmon packages) imported anywhere in these packages."""
    third, ours = set(), set()
    for package in packages:
        for path in (REPO / package.split("_")[1] / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in (n.split(".")[0] for n in names):
                    if name.startswith("flowmon_"):
                        ours.add(name)
                    elif name not in sys.stdlib_module_names:
                        third.add(name)
    return third, ours


def requirements(image: str) -> dict[str, str]:
    lines = (IMAGES / f"{image}-requirements.txt").read_text().splitlines()
    reqs = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower(): r for r in reqs}


@pytest.mark.parametrize(
    ("image", "packages"),
    [
        ("agent", ("flowmon_contract", "flowmon_kube", "flowmon_agent")),
        ("operator", ("flowmon_contract", "flowmon_kube", "flowmon_operator")),
    ],
)
def test_image_requirements_are_the_packages_imports_with_pyproject_bounds(image, packages):
    third, ours = third_party_imports(*packages)
    assert ours == set(packages), f"{image} image code imports {ours - set(packages)}"
    wanted = {DISTRIBUTIONS.get(name, name) for name in third - FROM_DEBIAN}
    reqs = requirements(image)
    assert set(reqs) == wanted
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all(req in declared for req in reqs.values()), "same version bounds as pyproject.toml"


# --- the entrypoint's header choice ----------------------------------------------------------------------
ENTRYPOINT = IMAGES / "agent-entrypoint.sh"
KREL = "6.1.0-99-amd64"
ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def tree(path: Path, *, build: bool = True, source: bool = True) -> Path:
    """A header tree with what the entrypoint checks: the build half (generated), the source half."""
    files = []
    if build:
        files += ["include/generated/autoconf.h", "include/generated/uapi/linux/version.h"]
    if source:
        files += ["include/linux/kconfig.h", f"arch/{ARCH}/include/asm/page.h"]
    for rel in files:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text("")
    return path


def run_entrypoint(root: Path, **env: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "FLOWMON_HOST_ROOT": str(root),
        "FLOWMON_KERNEL_RELEASE": KREL,
        "FLOWMON_GENERIC_HEADERS": str(root / "image-headers"),
        "NODE_NAME": "node-a",
        **env,
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "sh", "-c", 'echo "BCC_KERNEL_SOURCE=${BCC_KERNEL_SOURCE:-unset}"'],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def modules(root: Path) -> Path:
    (root / "lib/modules" / KREL).mkdir(parents=True, exist_ok=True)
    return root / "lib/modules" / KREL


def layout_debian_split(root: Path) -> str:
    """build -> the arch package (generated only), source -> the -common package: BCC finds both itself,
    so BCC_KERNEL_SOURCE must stay unset (naming build made BCC miss include/linux/kconfig.h)."""
    arch = tree(root / "usr/src/linux-headers-6.1.0-99-amd64", source=False)
    common = tree(root / "usr/src/linux-headers-6.1.0-99-common", build=False)
    (modules(root) / "build").symlink_to(arch)
    (modules(root) / "source").symlink_to(common)
    return "unset"


def layout_build_dir(root: Path) -> str:
    tree(modules(root) / "build")
    return "unset"


def layout_rhel(root: Path) -> str:
    return str(tree(root / "usr/src/kernels" / KREL))


def layout_dangling_build(root: Path) -> str:
    """The host has headers, but /usr/src is not mounted: the image's generic tree, saying why."""
    (modules(root) / "build").symlink_to(f"/nonexistent/usr/src/linux-headers-{KREL}")
    tree(root / "image-headers")
    return str(root / "image-headers")


def layout_incomplete_build(root: Path) -> str:
    tree(modules(root) / "build", source=False)  # Debian's arch package without -common
    tree(root / "image-headers")
    return str(root / "image-headers")


def layout_nothing_on_the_node(root: Path) -> str:
    tree(root / "image-headers")
    return str(root / "image-headers")


@pytest.mark.parametrize(
    "layout",
    [
        layout_debian_split,
        layout_build_dir,
        layout_rhel,
        layout_dangling_build,
        layout_incomplete_build,
        layout_nothing_on_the_node,
    ],
    ids=lambda f: f.__name__.removeprefix("layout_"),
)
def test_entrypoint_chooses_headers(tmp_path, layout):
    expected = layout(tmp_path)
    result = run_entrypoint(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"BCC_KERNEL_SOURCE={expected}"


def test_entrypoint_says_why_it_uses_the_generic_tree(tmp_path):
    layout_dangling_build(tmp_path)
    (tmp_path / "image-headers/RELEASE").write_text("6.1.0-57-amd64\n")
    stderr = run_entrypoint(tmp_path).stderr
    assert "the image's generic headers 6.1.0-57-amd64" in stderr
    assert f"links to /nonexistent/usr/src/linux-headers-{KREL}, which is not mounted" in stderr


def test_entrypoint_takes_an_explicit_tree_or_the_kernels_own(tmp_path):
    layout_debian_split(tmp_path)
    explicit = tree(tmp_path / "custom")
    result = run_entrypoint(tmp_path, FLOWMON_KERNEL_HEADERS=str(explicit))
    assert result.stdout.strip() == f"BCC_KERNEL_SOURCE={explicit}"
    # kheaders: the kernel's own tarball, unpacked into /tmp
    packed = tree(tmp_path / "packed")
    (tmp_path / "sys/kernel").mkdir(parents=True)
    subprocess.run(
        f"tar -C {packed} -c . | xz -1 > {tmp_path}/sys/kernel/kheaders.tar.xz", shell=True, check=True
    )
    result = run_entrypoint(tmp_path, FLOWMON_KERNEL_HEADERS="kheaders")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"BCC_KERNEL_SOURCE=/tmp/kheaders-{KREL}"
    subprocess.run(["rm", "-rf", f"/tmp/kheaders-{KREL}"], check=True)
    bad = run_entrypoint(tmp_path, FLOWMON_KERNEL_HEADERS=str(tmp_path / "nowhere"))
    assert bad.returncode == Cause.HEADERS and "is not a complete header tree" in bad.stderr


def test_entrypoint_without_any_tree_stops_with_the_headers_exit_code(tmp_path):
    termination = tmp_path / "termination-log"
    result = run_entrypoint(tmp_path)
    assert result.returncode == Cause.HEADERS == 13 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert f"no kernel header tree for kernel {KREL} on node node-a" in line
    assert f"apt install linux-headers-{KREL}" in line
    assert not termination.exists()  # (the real one is /dev/termination-log; not writable here)


def test_the_daemonset_mounts_where_the_entrypoint_looks():
    from flowmon_operator.builders import build_agent_daemonset
    from flowmon_operator.settings import OperatorSettings

    pod = build_agent_daemonset(OperatorSettings(), "0" * 64)["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    text = ENTRYPOINT.read_text()
    for path in ("/lib/modules", "/usr/src"):
        assert f"$ROOT{path}" in text and path in mounts


# --- the generic header tree -----------------------------------------------------------------------------
def debian_headers() -> tuple[Path, Path]:
    """This host's Debian linux-headers (make setup installs linux-headers-amd64 when it has none)."""
    arch = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    common = sorted(Path("/usr/src").glob("linux-headers-*-common"))
    assert arch and common, "Debian's linux-headers-amd64 is not installed: run make setup"
    return arch[-1], common[-1]


def test_header_list_is_small_and_relative():
    listed = [x for x in (IMAGES / "kernel-headers.txt").read_text().split() if not x.startswith("#")]
    assert 50 < len(listed) < 300 and all(not p.startswith("/") and ".." not in p for p in listed)
    assert "include/linux/kconfig.h" in listed and "include/generated/autoconf.h" in listed


COMPILE = """
import sys
from flowmon_agent.kernel import loader
flags = {"FLOWMON_COMPAT": int(sys.argv[1]), "FLOWMON_RAW": int(sys.argv[2]), "FLOWMON_RAW_RESET": 1}
loader.load_program("flowmon.c", flags).cleanup()
"""


@pytest.mark.root
@pytest.mark.parametrize(
    ("compat", "raw"), [(0, 1), (0, 0), (1, 0)], ids=["default-raw", "default", "compat"]
)
@pytest.mark.root
def test_flowmon_compiles_against_the_trimmed_tree_alone(tmp_path, compat, raw):
    """The tree the agent image carries, made the way its Dockerfile makes it, compiles and loads every
    kernel path of bpf/flowmon.c with nothing else (BCC_KERNEL_SOURCE names it). A file missing from
    images/kernel-headers.txt fails here with clang's "file not found"."""
    arch, common = debian_headers()
    made = subprocess.run(
        ["sh", str(IMAGES / "make-header-tree.sh"), str(IMAGES / "kernel-headers.txt"), str(tmp_path / "t"),
         str(arch), str(common)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "BCC_KERNEL_SOURCE": str(tmp_path / "t")}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, str(compat), str(raw)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


# --- the seccomp profile ---------------------------------------------------------------------------------
def test_seccomp_profile_is_the_runtime_default_plus_bpf_and_perf_event_open():
    sys.path.insert(0, str(IMAGES / "seccomp"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    default = json.loads(Path("/usr/share/containers/seccomp.json").read_text())  # containers-common (podman)
    committed = json.loads((IMAGES / "seccomp" / "flowmon-agent.json").read_text())
    assert committed == generate.agent_profile(default), "regenerate: see images/seccomp/generate.py"
    unconditional = [r for r in committed["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r]
    allowed = {name for rule in unconditional for name in rule["names"]}
    assert {"bpf", "perf_event_open"} <= allowed
    assert not {"kexec_load", "init_module", "ptrace", "setns", "mount", "unshare", "reboot"} & allowed
    assert committed["defaultAction"] == "SCMP_ACT_ERRNO"
