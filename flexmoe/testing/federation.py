"""Real Flower deployments on loopback, for the federation tests and benchmarks/federation_overhead.py.

:class:`Deployment` starts one ``flower-superlink`` and any number of ``flower-supernode``
processes on free loopback ports, each in its own session (process group) with its own
``FLWR_HOME`` under a temporary directory, runtime dependency installation disabled, and stops
every process it started, by PID, in :meth:`Deployment.close`. TLS uses certificates made here
with ``cryptography``; SuperNode authentication uses EC keys in OpenSSH format, registered with
``flwr supernode register``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""
    from cryptography import x509  # deferred: comes with Flower; TLS set-up only
    from cryptography.hazmat.primitives import hashes, serialization  # deferred: comes with Flower; TLS set-up only
    from cryptography.hazmat.primitives.asymmetric import ec  # deferred: comes with Flower; TLS set-up only
    from cryptography.x509.oid import NameOID  # deferred: comes with Flower; TLS set-up only

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("flexmoe test CA"))
        .issuer_name(name("flexmoe test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def make_supernode_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    from cryptography.hazmat.primitives import serialization  # deferred: comes with Flower; TLS set-up only
    from cryptography.hazmat.primitives.asymmetric import ec  # deferred: comes with Flower; TLS set-up only

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    private.chmod(0o600)
    return private, public


class Deployment:
    """A SuperLink and SuperNodes on loopback. Use as a context manager."""

    def __init__(self, root: Path, *, tls: bool = False, auth: bool = False):
        self.root, self.tls, self.auth = Path(root), tls, auth
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.keys: dict[str, Path] = {}  # SuperNode name -> its registered public key file (with auth)
        self.certs = make_certificates(self.root / "certs") if tls else None
        self.cli_home = self.root / "cli-home"
        self.cli_home.mkdir(exist_ok=True)
        conn = f'address = "{self.address}"\n'
        conn += f'root-certificates = "{self.certs["ca"]}"\n' if tls else "insecure = true\n"
        (self.cli_home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n{conn}')

    def env(self, name: str) -> dict[str, str]:
        home = self.root / f"home-{name}"
        home.mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(home),
            FLEXMOE_CACHE=str(self.root / "cache"),
            OMP_NUM_THREADS="1",  # two cores shared by every process of the test
            HF_HUB_OFFLINE="1",
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(name), cwd=self.root, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        argv = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            argv += [
                "--ssl-ca-certfile",
                str(self.certs["ca"]),
                "--ssl-certfile",
                str(self.certs["cert"]),
                "--ssl-keyfile",
                str(self.certs["key"]),
            ]
        else:
            argv += ["--insecure"]
        if self.auth:
            argv += ["--enable-supernode-auth"]
        self._start("superlink", argv)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited:\n{self.logs['superlink'].read_text()}")
            if "Uvicorn running" in self.logs["superlink"].read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink did not start:\n{self.logs['superlink'].read_text()}")

    def start_supernode(self, name: str, node_config: dict) -> subprocess.Popen:
        config = " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in node_config.items()
        )
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink",
            self.address,
            "--node-config",
            config,
            "--port",
            str(free_port()),
        ]
        argv += ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        if self.auth:
            private, public = make_supernode_key(self.root / "keys", name)
            self.flwr("supernode", "register", str(public), "test")
            self.keys[name] = public
            argv += ["--auth-supernode-private-key", str(private)]
        return self._start(f"supernode-{name}", argv)

    def flwr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = self.env("cli")
        env["FLWR_HOME"] = str(self.cli_home)
        result = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def run(self, app: Path, run_config: dict) -> int:
        """``flwr run`` with ``run_config`` (a TOML file of overrides); returns the run id."""
        import tomli_w  # deferred: via Flower, not a flexmoe dependency; only `flwr run` overrides need it

        path = self.root / f"run-config-{time.monotonic_ns()}.toml"
        path.write_text(tomli_w.dumps(run_config))
        out = self.flwr("run", str(app), "test", "--run-config", str(path), "--format", "json").stdout
        return int(json.loads(out[out.index("{") :])["run-id"])

    def status(self, run_id: int) -> dict:
        out = self.flwr("ls", "test", "--run-id", str(run_id), "--format", "json").stdout
        return json.loads(out[out.index("{") :])["runs"][0]

    def wait(self, run_id: int, timeout: float, until=None) -> dict:
        """The run's final ``flwr ls`` entry (``status`` like ``finished:completed``).

        ``until``: a cheap check (e.g. that the coordinator wrote its report) polled first, so the
        ``flwr`` command, a Python process of its own, is not started every few seconds on a busy machine.
        """
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while until is not None and not until() and time.monotonic() < deadline:
            if time.monotonic() - checked > 30:  # in case the run failed before writing anything
                if self.status(run_id)["status"].startswith("finished"):
                    break
                checked = time.monotonic()
            time.sleep(1)
        while True:
            run = self.status(run_id)
            if run["status"].startswith("finished") or time.monotonic() > deadline:
                return run
            time.sleep(2)

    def log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), "test", "--show", check=False, timeout=60).stdout

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (it and the apps it spawned), by its PID."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):  # children that outlived their group leader
                os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def message_to(node: int, content, message_type: str, message_id: str = "m1"):
    """A coordinator's message ``content`` of ``message_type`` to ``node`` in run 1, as a Flower
    ``Message``: what the tests hand a ClientApp directly, without a SuperLink."""
    from flwr.app import Message, Metadata  # deferred: only the federation tests build messages

    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="flexmoe",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)
