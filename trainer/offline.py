"""The offline environment: HF offline variables, the socket guard, and `trainer doctor`.

The guard patches socket connect and name resolution so that any non-loopback connection
raises NetworkBlocked naming the caller, before a single packet leaves the machine. An
allow-list adds exact hosts (GRPO allows the host of server.url, e.g. the compose service
`server`): the name may be resolved, and only the addresses it resolved to may be
connected to.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import traceback

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkBlocked(ConnectionError):
    """A connection to a non-loopback address while run.offline is true."""


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _caller() -> str:
    """The innermost frame outside the socket and HTTP plumbing: the code that asked."""
    plumbing = ("/http/", "/urllib3/", "/requests/", "/httpx/", "/httpcore/", "/asyncio/", "/anyio/")
    for frame in reversed(traceback.extract_stack()[:-1]):
        name = os.path.basename(frame.filename)
        if frame.filename == __file__ or name in ("socket.py", "ssl.py") or any(p in frame.filename for p in plumbing):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "unknown caller"


def _blocked(host, port) -> NetworkBlocked:
    return NetworkBlocked(f"network access to {host}:{port} blocked by Airlock's offline guard (run.offline=true), "
                          f"called from {_caller()}; everything must load from local folders")


_original = {}
# hosts the guard lets through besides loopback: names as written in a URL, and the
# addresses those names resolved to (a compose service name -> its container address)
_allowed_names: set[str] = set()
_allowed_addrs: set[str] = set()


def _norm(host) -> str:
    if isinstance(host, bytes):
        host = host.decode()
    return str(host).strip("[]").split("%")[0].lower()


def allow_hosts(hosts) -> None:
    """Let connections to these hosts (names or IP literals) through the guard, and to the
    addresses the names resolve to. Everything else stays blocked."""
    for host in hosts:
        host = _norm(host)
        if not host:
            continue
        try:
            _allowed_addrs.add(str(ipaddress.ip_address(host)))
        except ValueError:
            _allowed_names.add(host)


def host_allowed(host) -> bool:
    """True for loopback, an allowed name, or an address an allowed name resolved to."""
    if is_loopback(host):
        return True
    host = _norm(host)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        return host in _allowed_names
    return host in _allowed_addrs


def check_address(family, address) -> None:
    """Raise NetworkBlocked unless an AF_INET/AF_INET6 `address` may be connected to."""
    if family in (socket.AF_INET, socket.AF_INET6) and not host_allowed(address[0]):
        raise _blocked(address[0], address[1])


def install_guard(allow=()) -> None:
    """Idempotent (a second call only adds to the allow-list). Loopback and Unix sockets
    stay allowed (the GRPO server in tests); `allow` names more hosts, e.g. the compose
    service of the generation server."""
    allow_hosts(allow)
    if _original:
        return
    _original["connect"] = socket.socket.connect
    _original["connect_ex"] = socket.socket.connect_ex
    _original["getaddrinfo"] = socket.getaddrinfo

    def connect(self, address):
        check_address(self.family, address)
        return _original["connect"](self, address)

    def connect_ex(self, address):
        check_address(self.family, address)
        return _original["connect_ex"](self, address)

    def getaddrinfo(host, port, *args, **kwargs):
        if host is None or is_loopback(host):
            return _original["getaddrinfo"](host, port, *args, **kwargs)
        if not host_allowed(host):
            raise _blocked(host, port)
        infos = _original["getaddrinfo"](host, port, *args, **kwargs)
        if _norm(host) in _allowed_names:  # its addresses may be connected to from now on
            _allowed_addrs.update(str(ipaddress.ip_address(_norm(info[4][0]))) for info in infos)
        return infos

    def sendto(self, data, *args):  # sendto(data, address) or sendto(data, flags, address): UDP
        check_address(self.family, args[-1])
        return _original["sendto"](self, data, *args)

    def sendmsg(self, buffers, *args):  # the address, when given, is the 4th argument
        if len(args) >= 3 and args[2] is not None:
            check_address(self.family, args[2])
        return _original["sendmsg"](self, buffers, *args)

    def resolver(name):  # gethostbyname & co ask DNS directly, without getaddrinfo
        def guarded(host, *args):
            target = host[0] if isinstance(host, tuple) else host
            if not is_loopback(target) and not host_allowed(target):
                raise _blocked(target, host[1] if isinstance(host, tuple) else "-")
            return _original[name](host, *args)
        return guarded

    for name in ("sendto", "sendmsg"):
        _original[name] = getattr(socket.socket, name)
    for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        _original[name] = getattr(socket, name)
        setattr(socket, name, resolver(name))
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.socket.sendmsg = sendmsg
    socket.getaddrinfo = getaddrinfo


def remove_guard() -> None:
    _allowed_names.clear()
    _allowed_addrs.clear()
    if not _original:
        return
    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        setattr(socket.socket, name, _original.pop(name))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, _original.pop(name))


def guard_active() -> bool:
    return bool(_original)


def go_offline(allow_hosts=()) -> None:
    """Offline environment variables plus the socket guard; `allow_hosts` (e.g. the host of
    server.url) may be reached besides loopback."""
    set_offline_env()
    install_guard(allow=allow_hosts)


def doctor(cfg) -> int:
    """Report versions, device, offline mode and whether the config's tokenizer, weights and
    data are present and load under the socket guard. -> number of problems."""
    import platform

    import numpy
    import peft
    import tokenizers
    import torch
    import transformers

    from trainer import data, model as models, tokenizer as tk
    from trainer.errors import UserError

    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}")

    print("versions:")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, tokenizers {tokenizers.__version__}, numpy {numpy.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} "
          f"(run.device={cfg.run.device}, {torch.get_num_threads()} CPU threads)")
    print("offline:")
    set_offline_env()
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        report(os.environ.get(key) == "1", key, os.environ.get(key, "unset"))
    install_guard()
    report(guard_active(), "socket guard", "installed: non-loopback connections raise")
    print("assets (loaded under the guard):")
    tok = None
    try:
        path = data.find_prepared(cfg.data)  # train's own matching: a folder with other settings fails here
        if (path / "meta.json").is_file():
            meta = data.read_meta(path)
            report(True, "data", f"{path}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
                                 f"{meta['tokenizer']} vocab {meta['vocab_size']}")
            tok = tk.load(path)
            report(True, "tokenizer", f"{path / tk.TOKENIZER_FILE}: {tok.get_vocab_size()} tokens")
        else:
            found = cfg.data.source == data.STDLIB or os.path.exists(cfg.data.source)
            report(found, "data", f"{path} not prepared yet: the first `trainer train` with this config prepares it "
                                  f"from data.source={cfg.data.source!r}" + ("" if found else ", which does not exist")
                                  + " (or run `trainer prepare` with this config now)")
    except UserError as e:
        report(False, "data", str(e))
    except (OSError, ValueError) as e:
        report(False, "data", f"{e} (run `trainer prepare` with this config)")
    if tok is None and cfg.data.tokenizer == "gpt2":
        try:
            tok = tk.load_gpt2(cfg.data.tokenizer_path)
            report(True, "tokenizer", f"gpt2 from local files: {tok.get_vocab_size()} tokens")
        except (UserError, NetworkBlocked) as e2:
            report(False, "tokenizer", str(e2))
    if cfg.model.type == "gpt2":
        try:
            m = models.load_pretrained(cfg.model.path)
            fixture = (os.path.exists(os.path.join(cfg.model.path, "FIXTURE.txt")))
            report(True, "weights", f"{cfg.model.path}: {sum(p.numel() for p in m.parameters()):,} parameters"
                                    + (" (FIXTURE: tiny random GPT-2 for tests, not the real weights)" if fixture else ""))
        except (UserError, NetworkBlocked, OSError, ValueError) as e:
            report(False, "weights", str(e))
    else:
        report(True, "weights", "from_scratch: initialised from run.seed, nothing to load")
    print("ok: this config needs no network" if problems == 0 else f"{problems} problem(s) found")
    sys.stdout.flush()
    return problems


def doctor_command(config: str | None = None, **overrides) -> None:
    """Check that a config can run here with no network: versions, device, offline mode,
    and the tokenizer, weights and data it needs, loaded under the socket guard.

    Args:
      config: YAML file to check (default: the built-in defaults).
    """
    from trainer import config as configs

    problems = doctor(configs.load(config, **overrides))
    if problems:
        sys.exit(1)
