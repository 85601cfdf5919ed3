"""The relays bench/run.py compares, one class each, behind one interface (`Relay`).

Every relay is a private instance: its own configuration (rendered from
bench/peers/), queue and logs in a directory of its own, listening on
127.0.0.1:<port> and relaying everything to the sink at 127.0.0.1:<sink_port>
with its default durable queue.  Nothing here touches a system-wide mail
setup: the Debian packages of the peers conflict with Postfix's (each
"Provides: mail-transport-agent"), so Exim and OpenSMTPD are downloaded with
`apt-get download` and unpacked under bench/work/pkgs (their libraries are
installed with apt), and Haraka is installed with npm into bench/work/haraka.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar, Protocol

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
PEERS = ROOT / "bench" / "peers"
# The peers' daemons drop to their own users: their directories must be
# reachable by them, which a checkout in a private (0700) folder may not be.
PRIVATE = Path("/var/tmp/relaywatch-bench")
HOST = "127.0.0.1"
HARAKA_VERSION = "3.3.4"


class Relay(Protocol):
    """What a scenario needs from a relay under test."""

    name: ClassVar[str]          # the results table's column
    port: int                    # where the load goes (on HOST)

    def __init__(self, sink_port: int) -> None: ...

    @classmethod
    def install(cls) -> str | None:
        """Make the relay runnable here; None when ready, else why not (the relay is skipped)."""

    def start(self) -> "Relay": ...

    def flush(self) -> None:
        """Deliver deferred mail now (postqueue -f and its equivalents)."""

    def queue_size(self) -> int:
        """Messages still in the relay's queue (0 once it has delivered everything)."""

    def rss_kb(self) -> int:
        """Resident memory of all the relay's processes."""

    def stop(self) -> None: ...


# -- helpers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the relay exited ({proc.returncode}) before answering on {HOST}:{port}")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on {HOST}:{port}")


def render(template: Path, dest: Path, **values: object) -> None:
    """Copy a bench/peers template, replacing {{KEY}} with values[KEY]."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{(\w+)\}\}", text)
    if left:
        raise RuntimeError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    dest.write_text(text)


def proc_status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_kb(pid: int) -> int:
    return sum(proc_status(p, "VmRSS") for p in process_tree(pid))


def stop_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process and, if it leaves any, its children."""
    pids = process_tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in pids[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(*args: str | Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


def apt_install(*packages: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
                    *packages], env=env, check=True, stdout=subprocess.DEVNULL)


def unpack_deb(package: str) -> Path:
    """`apt-get download` a package and unpack it under bench/work/pkgs (no
    install: the mail servers' packages conflict with Postfix's).  Its library
    dependencies are installed with apt."""
    dest = WORK / "pkgs" / package
    if (dest / "usr").exists():
        return dest
    debs = WORK / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    debs.chmod(0o777)               # apt's download user (_apt) writes here
    if not list(debs.glob(f"{package}_*.deb")):
        print(f"downloading {package} (Debian package, unpacked under bench/work/pkgs)...", flush=True)
        run("apt-get", "download", package, cwd=debs)
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    depends = run("dpkg-deb", "-f", deb, "Depends").stdout
    libraries = sorted({d.split()[0] for d in re.split(r"[,|]", depends)
                        if d.split() and d.split()[0].startswith(("lib", "zlib"))})
    apt_install(*libraries)
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run("dpkg-deb", "-x", deb, tmp)
    tmp.rename(dest)
    return dest


def system_user(name: str, home: str, group: str | None = None) -> None:
    """The system user a package's postinst would have created."""
    if run("id", name, check=False).returncode == 0:
        return
    group_args = ["--ingroup", group] if group else ["--group"]
    if group and run("getent", "group", group, check=False).returncode != 0:
        run("addgroup", "--system", group)
    run("adduser", "--system", "--quiet", "--home", home, "--no-create-home", "--disabled-password",
        "--allow-bad-names", *group_args, name)


def private_dir(name: str, port: int) -> Path:
    PRIVATE.mkdir(parents=True, exist_ok=True)
    PRIVATE.chmod(0o755)
    path = PRIVATE / f"{name}-{port}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def namespaces_missing() -> str | None:
    """Why the peers cannot have a mount namespace of their own here, if they cannot."""
    if not shutil.which("unshare"):
        return "needs unshare(1) (util-linux) for a private resolv.conf and queue path"
    probe = run("unshare", "-m", "true", check=False)
    if probe.returncode != 0:
        return f"unshare -m is not permitted here ({probe.stdout.strip()})"
    return None


def count_files(*dirs: Path) -> int:
    return sum(1 for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())


# -- relaywatch -----------------------------------------------------------------------------------

class Relaywatch:
    name = "relaywatch"
    start_timeout = 60.0     # two processes to start, on a machine that may be busy
    root = ROOT              # the tree relaywatch is imported from (bench/cpu_ab.py compares two)

    def __init__(self, sink_port: int, extra: str = "", extra_connectors: str = "", queue_extra: str = ""):
        self.port = free_port()
        self.dir = WORK / f"relaywatch-{self.port}"
        self.sink_port = sink_port
        self.extra = extra
        self.extra_connectors = extra_connectors
        self.queue_extra = queue_extra or 'retry_intervals = ["1m", "5m", "10m", "15m", "30m", "60m"]'
        self.proc = None

    @classmethod
    def install(cls) -> str | None:
        return None

    def start(self) -> "Relaywatch":
        self.prepare()
        try:
            self.launch()
        except BaseException:
            self.stop()     # not left running (and, on PostgreSQL, logging about a dropped schema)
            raise
        return self

    def prepare(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "data").mkdir(parents=True)
        (self.dir / "relaywatch.toml").write_text(f"""
[server]
hostname = "bench.relaywatch"
listen = ["{HOST}:{self.port}"]
data_dir = "data"
max_connections_per_ip = 1000
[queue]
{self.queue_extra}
[delivery]
connection_idle = "2s"
{self.extra}
[[connectors]]
name = "sink"
type = "partner"
domains = ["sink.test"]
smart_hosts = ["{HOST}:{self.sink_port}"]
tls = "none"
{self.extra_connectors}
""" + ("" if "[http]" in self.extra else
       # The console stays on, as by default, but on a port of its own: the default 8025 may be
       # held by another relay on this machine (a test's, an admin's), and the bench would not start.
       f'[http]\nlisten = "{HOST}:0"\n'))

    def launch(self) -> None:
        self.log = open(self.dir / "relaywatch.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "relaywatch", "serve", "-c",
                                      str(self.dir / "relaywatch.toml")],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
                                     env=dict(os.environ, PYTHONPATH=str(self.root)))
        wait_port(self.port, timeout=self.start_timeout, proc=self.proc)

    def flush(self) -> None:
        subprocess.run([sys.executable, "-m", "relaywatch", "queue", "retry", "--all", "-c",
                        str(self.dir / "relaywatch.toml")], cwd=self.root, check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(self.root)))

    def queue_size(self) -> int:
        conn = sqlite3.connect(f"file:{self.dir / 'data' / 'queue.sqlite3'}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        finally:
            conn.close()

    def peak_rss_kb(self) -> int:
        return proc_status(self.proc.pid, "VmHWM")

    def rss_kb(self) -> int:
        return tree_rss_kb(self.proc.pid)

    def stop(self) -> None:
        if self.proc:
            stop_tree(self.proc)
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


# -- Postfix (the reference; mandatory) -----------------------------------------------------------

class Postfix:
    name = "postfix"

    def __init__(self, sink_port: int, extra: str = ""):
        self.port = free_port()
        self.sink_port = sink_port
        self.extra = extra

    @classmethod
    def install(cls) -> str | None:
        """Postfix is the reference and brings the load and the sink: failing to
        install it fails the run (an exception), it is never skipped."""
        if shutil.which("smtp-source") and shutil.which("postfix") and Path("/etc/postfix/main.cf").exists():
            return None
        print("installing postfix (for smtp-source, smtp-sink and the reference relay)...", flush=True)
        subprocess.run("echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections",
                       shell=True, check=False)
        apt_install("postfix")
        main_cf = Path("/etc/postfix/main.cf")
        if not main_cf.exists():
            # The instances here use their own config directories; the postfix
            # command still wants a default main.cf to exist.
            main_cf.write_text("compatibility_level = 3.6\n")
        return None

    def start(self) -> "Postfix":
        self.dir = private_dir("postfix", self.port)
        conf = self.dir / "conf"
        conf.mkdir()
        (self.dir / "queue").mkdir()
        (self.dir / "data").mkdir()
        shutil.chown(self.dir / "data", "postfix")
        render(PEERS / "postfix" / "main.cf", conf / "main.cf", DIR=self.dir, HOST=HOST, SINK_PORT=self.sink_port,
               EXTRA=self.extra)
        master = Path("/etc/postfix/master.cf").read_text()
        master = re.sub(r"^smtp\s+inet\s+.*$", f"{HOST}:{self.port} inet n - n - - smtpd", master, flags=re.M)
        master += "\npostlog   unix-dgram n  -       n       -       1       postlogd\n"
        (conf / "master.cf").write_text(master)
        self.conf = conf
        run("postfix", "-c", conf, "check", check=False)
        run("postfix", "-c", conf, "start")
        wait_port(self.port)
        return self

    def flush(self) -> None:
        run("postqueue", "-c", self.conf, "-f")

    def queue_size(self) -> int:
        queue = self.dir / "queue"
        return count_files(*(queue / d for d in ("maildrop", "incoming", "active", "deferred", "hold")))

    def rss_kb(self) -> int:
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        return tree_rss_kb(int(pid_file.read_text().split()[0])) if pid_file.exists() else 0

    def stop(self) -> None:
        run("postfix", "-c", self.conf, "stop", check=False)
        # postfix stop returns before every process has exited
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and run("postfix", "-c", self.conf, "status",
                                                  check=False).returncode == 0:
            time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the peers ------------------------------------------------------------------------------------

class _Daemon:
    """A peer that runs as one foreground process (and its children), in a
    mount namespace of its own where /etc/resolv.conf names 127.0.0.1, where no
    DNS server listens: the peers look their clients up in the DNS (Exim's
    host_lookup, OpenSMTPD's and Haraka's reverse lookups), and the machine's
    resolver is not on loopback.  Their queries are refused at once and
    /etc/hosts answers for 127.0.0.1 as before, so all traffic stays on
    127.0.0.0/8.  `binds` puts more private paths over fixed ones."""

    proc: subprocess.Popen | None = None

    def _launch(self, cmd: list, binds: dict[Path, Path] | None = None) -> None:
        resolv = self.dir / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        resolv.chmod(0o644)
        mounts = {resolv: Path("/etc/resolv.conf"), **(binds or {})}
        script = " && ".join(f"mount --bind {src} {dest}" for src, dest in mounts.items())
        wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"{script} && exec " + " ".join(str(c) for c in cmd)]
        self.log = open(self.dir / "daemon.log", "wb")
        self.proc = subprocess.Popen(wrapped, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError as exc:
            self.stop(keep=True)
            tail = (self.dir / "daemon.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name}: {exc}\n{tail}") from None

    def rss_kb(self) -> int:
        return tree_rss_kb(self.proc.pid) if self.proc else 0

    def stop(self, keep: bool = False) -> None:
        if self.proc:
            stop_tree(self.proc, timeout=40)
            self.proc = None
            self.log.close()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class Exim(_Daemon):
    """Debian's exim4-daemon-light: `exim4 -C conf -bdf -q30m`, its own spool."""

    name = "exim"
    package = "exim4-daemon-light"
    # Exim's own default is 10: see bench/peers/exim4/exim4.conf and bench/README.md
    # (bench/run.py --exim-queue-per-connection 10 runs it so).
    queue_per_connection = 0

    def __init__(self, sink_port: int):
        self.port = free_port()
        self.sink_port = sink_port

    @classmethod
    def binary(cls) -> Path:
        return WORK / "pkgs" / cls.package / "usr" / "sbin" / "exim4"

    @classmethod
    def install(cls) -> str | None:
        if reason := namespaces_missing():
            return reason
        try:
            unpack_deb(cls.package)
            # the user exim4-base's postinst creates; exim looks it up at start
            system_user("Debian-exim", "/var/spool/exim4")
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"could not install {cls.package}: {exc}"
        return None

    def _exim(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(self.binary(), "-C", self.conf, *args, check=check)

    def start(self) -> "Exim":
        self.dir = private_dir("exim", self.port)
        for sub in ("spool", "log"):
            (self.dir / sub).mkdir()
            shutil.chown(self.dir / sub, "Debian-exim", "Debian-exim")
        self.conf = self.dir / "exim4.conf"
        render(PEERS / "exim4" / "exim4.conf", self.conf, EXIM_PATH=self.binary(), DIR=self.dir, PORT=self.port,
               SINK_PORT=self.sink_port, QUEUE_PER_CONNECTION=self.queue_per_connection)
        # -bdf: the daemon in the foreground; -q30m: Debian's queue-runner interval
        self._launch([self.binary(), "-C", self.conf, "-bdf", "-q30m"])
        return self

    def flush(self) -> None:
        self._exim("-qff")

    def queue_size(self) -> int:
        return int(self._exim("-bpc").stdout.split()[-1])


class OpenSMTPD(_Daemon):
    """Debian's opensmtpd: `smtpd -d -f conf`.  Its queue path is compiled in
    (/var/spool/smtpd): the instance runs in a mount namespace of its own, with
    a private directory bound over that path."""

    name = "opensmtpd"
    package = "opensmtpd"
    SPOOL = Path("/var/spool/smtpd")
    SOCKET = Path("/run/smtpd.sock")        # compiled in too; one instance at a time

    def __init__(self, sink_port: int):
        self.port = free_port()
        self.sink_port = sink_port

    @classmethod
    def binary(cls, name: str = "smtpd") -> Path:
        return WORK / "pkgs" / cls.package / "usr" / "sbin" / name

    @classmethod
    def install(cls) -> str | None:
        if reason := namespaces_missing():
            return reason
        try:
            unpack_deb(cls.package)
            # the users and the chroot directory opensmtpd's postinst creates
            system_user("opensmtpd", "/var/lib/opensmtpd/empty", group="opensmtpd")
            system_user("opensmtpq", "/var/lib/opensmtpd/empty", group="opensmtpq")
            Path("/var/lib/opensmtpd/empty").mkdir(parents=True, exist_ok=True)
            # smtpctl refuses to run unless setgid opensmtpq (the postinst's dpkg-statoverride)
            shutil.chown(cls.binary("smtpctl"), "root", "opensmtpq")
            cls.binary("smtpctl").chmod(0o2755)
            cls.SPOOL.mkdir(parents=True, exist_ok=True)     # the mount point
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"could not install {cls.package}: {exc}"
        return None

    def start(self) -> "OpenSMTPD":
        if self.SOCKET.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.SOCKET))
                raise RuntimeError(f"another smtpd is running ({self.SOCKET} answers)")
            except ConnectionRefusedError:
                self.SOCKET.unlink()
        self.dir = private_dir("opensmtpd", self.port)
        (self.dir / "spool").mkdir(mode=0o711)
        self.conf = self.dir / "smtpd.conf"
        render(PEERS / "opensmtpd" / "smtpd.conf", self.conf, PORT=self.port, SINK_PORT=self.sink_port)
        self._launch([self.binary(), "-d", "-f", self.conf], binds={self.dir / "spool": self.SPOOL})
        return self

    def flush(self, timeout: float = 600) -> None:
        """`smtpctl resume route` + `smtpctl schedule all`, once a second until the
        queue is empty.  A destination that refused connections is a disabled
        route for a while ("Disabling route ... for 15s"), and its envelopes stay
        in flight in the mta until it gives up on them (then they wait for the
        scheduler's backoff): a single `schedule all` finds none to schedule.
        Repeating it is what an administrator would have to do; the drain time is
        then OpenSMTPD's delivery, not its backoff.  Blocks, as `exim -qff` does."""
        smtpctl = self.binary("smtpctl")
        deadline = time.monotonic() + timeout
        while self.queue_size() and time.monotonic() < deadline:
            for route in re.findall(r"(?m)^([0-9a-f]+)\.", run(smtpctl, "show", "routes").stdout):
                run(smtpctl, "resume", "route", route, check=False)
            run(smtpctl, "schedule", "all")
            time.sleep(1)

    def queue_size(self) -> int:
        # queue/<bucket>/<message>/{message,envelopes/...}: one "message" file per queued message
        spool = self.dir / "spool"
        return (sum(1 for _ in (spool / "queue").glob("*/*/message"))
                + sum(1 for _ in (spool / "incoming").glob("*")))


class Haraka(_Daemon):
    """Haraka from npm (bench/work/haraka), relaying through its outbound queue."""

    name = "haraka"

    def __init__(self, sink_port: int):
        self.port = free_port()
        self.sink_port = sink_port

    @classmethod
    def binary(cls) -> Path:
        return WORK / "haraka" / "node_modules" / "Haraka" / "bin" / "haraka"

    @classmethod
    def install(cls) -> str | None:
        if reason := namespaces_missing():
            return reason
        if cls.binary().exists():
            return None
        if not (shutil.which("node") and shutil.which("npm")):
            return "needs node and npm (apt-get install nodejs npm)"
        print(f"installing Haraka {HARAKA_VERSION} with npm into bench/work/haraka...", flush=True)
        (WORK / "haraka").mkdir(parents=True, exist_ok=True)
        done = run("npm", "install", "--no-audit", "--no-fund", "--prefix", WORK / "haraka",
                   f"Haraka@{HARAKA_VERSION}", check=False)
        if done.returncode != 0 or not cls.binary().exists():
            return f"npm install Haraka@{HARAKA_VERSION} failed: {done.stdout.strip()[-300:]}"
        return None

    def start(self) -> "Haraka":
        self.dir = private_dir("haraka", self.port)
        # Haraka's own skeleton (its default config files), then ours over it
        run("node", self.binary(), "-i", self.dir)
        template = PEERS / "haraka"
        for src in template.rglob("*"):
            dest = self.dir / src.relative_to(template)
            if src.is_dir():
                dest.mkdir(exist_ok=True)
            else:
                render(src, dest, PORT=self.port, SINK_PORT=self.sink_port)
        (self.dir / "queue").mkdir()
        self._launch(["node", self.binary(), "-c", self.dir])
        return self

    def flush(self) -> None:
        run("node", self.binary(), "-c", self.dir, "--qunstick")

    def queue_size(self) -> int:
        return count_files(self.dir / "queue")


PEER_CLASSES: tuple[type, ...] = (Exim, OpenSMTPD, Haraka)
RELAY_CLASSES: tuple[type, ...] = (Relaywatch, Postfix) + PEER_CLASSES
