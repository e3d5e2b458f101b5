"""``m365relay init``: ask (or read flags), write the credential, the config and the scripts.

Nothing is half-written: new files are made first, the config text is checked with the relay's
own loader, and only then is the config replaced (atomically, the old one kept as ``.bak``).
Device passwords are printed once, here, and stored only as argon2 hashes.
"""

from __future__ import annotations

import argparse
import grp
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from relay.setup import answers, configfile
from relay.setup.answers import Plan, UsageError

if TYPE_CHECKING:
    from relay.setup.certs import CertificateFiles

EX_USAGE = 2
EX_CONFIG = 78


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "init", help="write an app certificate, a checked config and the Microsoft 365 setup "
                     "scripts (asks in a terminal; every answer has a flag)",
        description="Create (or extend) a config: an RSA key and self-signed certificate for the "
                    "app registration, device accounts with generated passwords, and "
                    "setup-m365.ps1 / setup-m365-az.sh for an admin to run. Run it again with "
                    "--mailbox, --device or --client-id to add to an existing config.")
    p.add_argument("--config", "-c", type=Path, default=Path("/etc/m365relay/m365relay.yaml"),
                   help="config to write or extend (default /etc/m365relay/m365relay.yaml); "
                        "keys, certificates and scripts go in its folder")
    p.add_argument("--tenant", help="tenant domain (contoso.onmicrosoft.com) or tenant id")
    p.add_argument("--app", help="name of the app in the config (default: from the tenant)")
    p.add_argument("--client-id", help="the app registration's Application (client) ID, once "
                                       "known (setup-m365.ps1 prints it)")
    p.add_argument("--mailbox", action="append", default=[], metavar="ADDRESS",
                   help="a mailbox to send as (repeatable)")
    p.add_argument("--device", action="append", default=[], metavar="NAME[=MAILBOX]",
                   help="a device that logs in; its password is generated and printed once")
    p.add_argument("--trusted-network", action="append", default=[], metavar="CIDR[=MAILBOX]",
                   help="devices on this network send without a password")
    p.add_argument("--network", action="append", default=[], metavar="CIDR",
                   help="other networks that may connect (default: the trusted ones, or this "
                        "host only)")
    p.add_argument("--listen", metavar="HOST:PORT", help="device port (default 0.0.0.0:587 for "
                   "a LAN with TLS, 127.0.0.1:2525 for this host only)")
    p.add_argument("--tls", choices=["none", "starttls", "implicit"],
                   help="TLS on the device port (default starttls when devices log in); a "
                        "self-signed certificate is made unless --tls-cert is given")
    p.add_argument("--tls-cert", type=Path, help="listener certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="listener private key (PEM)")
    p.add_argument("--cloud", choices=answers.CLOUD_NAMES, help="national cloud (default global)")
    p.add_argument("--hve", action="store_true", help="the mailboxes are High Volume Email "
                                                      "accounts")
    p.add_argument("--transport", choices=["smtp", "graph"],
                   help="deliver over SMTP AUTH (default) or Microsoft Graph sendMail")
    p.add_argument("--grant", choices=["FullAccess", "RBAC"],
                   help="mailbox access: FullAccess per mailbox (default) or RBAC for "
                        "Applications scoped to the mailboxes")
    p.add_argument("--spool", type=Path, help="queue folder (default /var/spool/m365relay)")
    p.add_argument("--group", help="give this group read access to the config and keys "
                                   "(mode 0640), e.g. m365relay: the packaged layout")
    p.add_argument("--non-interactive", "--yes", "-y", dest="non_interactive",
                   action="store_true", help="never ask; fail naming the missing flags")
    p.set_defaults(func=cmd_init)


def _check_flags(args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.hve and args.transport == "graph":
        raise UsageError("--hve sends over SMTP (smtp.hve.mx.microsoft); leave out --transport "
                         "graph")
    if args.group is not None:
        try:
            grp.getgrnam(args.group)
        except KeyError:
            raise UsageError(f"--group {args.group}: no such group (create the relay's user "
                             "first, e.g. systemd-sysusers)") from None


def _same_app(args: argparse.Namespace, raw: dict[str, Any] | None) -> None:
    """On an existing config, flags that would change it are refused rather than ignored."""
    if raw is not None:
        given = [flag for flag, value in (("--listen", args.listen), ("--tls", args.tls),
                                          ("--network", args.network),
                                          ("--tls-cert", args.tls_cert), ("--spool", args.spool))
                 if value]
        if given:
            raise UsageError(f"{', '.join(given)}: init writes listeners and the spool only into "
                             "a new config; edit `listeners` / `spool` in the existing one")
    apps = (raw or {}).get("apps") or {}
    name = args.app or (next(iter(apps)) if len(apps) == 1 else None)
    known = apps.get(name) if isinstance(apps, dict) else None
    if not isinstance(known, dict):
        return
    for flag, key, value, default in (("--tenant", "tenant", args.tenant, None),
                                      ("--cloud", "cloud", args.cloud, "global"),
                                      ("--transport", "transport", args.transport, "smtp"),
                                      ("--hve", "hve", args.hve or None, False)):
        if value is not None and value != known.get(key, default):
            raise UsageError(f"apps.{name}.{key} is {known.get(key, default)!r}; init does not "
                             f"change an existing app ({flag}): edit the config, or add another "
                             "with --app NEWNAME")


def cmd_init(args: argparse.Namespace) -> int:
    path = args.config.expanduser().absolute()
    try:
        _check_flags(args)
        raw = _existing(path)
        _same_app(args, raw)
        # Questions only on a terminal, and only when a required answer is missing.
        interactive = (not args.non_interactive and sys.stdin.isatty()
                       and _something_missing(args, raw))
        plan = answers.gather(args, raw, answers.Asker(interactive))
        if interactive and not _confirm(plan, path):
            print("Nothing was written.")
            return 1
        return _apply(args, plan, path, raw)
    except UsageError as exc:
        print(f"m365relay init: {exc}", file=sys.stderr)
        return EX_USAGE
    except (configfile.MergeError, FileExistsError, OSError) as exc:
        print(f"m365relay init: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (EOFError, KeyboardInterrupt):
        print("\nNothing was written.", file=sys.stderr)
        return 1


def _something_missing(args: argparse.Namespace, raw: dict[str, Any] | None) -> bool:
    adds = bool(args.mailbox or args.device or args.trusted_network)
    if raw is None:
        return not (args.tenant and adds)
    new_app = args.app is not None and args.app not in (raw.get("apps") or {})
    return not (adds or args.client_id) or (new_app and not args.tenant)


def _existing(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UsageError(f"{path} exists but is not a YAML mapping; choose another --config")
    return data


def _confirm(plan: Plan, path: Path) -> bool:
    print(f"\nAbout to {'extend' if path.exists() else 'write'} {path}:")
    print(f"  app {plan.app}: tenant {plan.tenant}, cloud {plan.cloud}, transport "
          f"{plan.transport}{', HVE' if plan.hve else ''}")
    for device, box in plan.devices:
        print(f"  device {device} (password) -> {box}")
    for net, box in plan.trusted:
        print(f"  network {net} (no password) -> {box}")
    return input("Write these files? [Y/n] ").strip().lower() in ("", "y", "yes")


def _file_ref(target: Path, folder: Path) -> str:
    """Relative to the config's folder when inside it, so the folder can move as a whole."""
    try:
        return str(target.relative_to(folder))
    except ValueError:
        return str(target)


def _accounts(plan: Plan, raw: dict[str, Any] | None) -> tuple[list[configfile.NewAccount],
                                                               list[tuple[str, str]]]:
    from relay.policy.passwords import hash_password  # argon2: only for a device password

    taken = {a.get("name") for a in (raw or {}).get("accounts") or [] if isinstance(a, dict)}
    users = {a.get("username") for a in (raw or {}).get("accounts") or [] if isinstance(a, dict)}
    out, passwords = [], []
    for device, box in plan.devices:
        if device in taken or device in users:
            raise UsageError(f"an account named {device!r} exists already; pick another name: "
                             f"--device NEWNAME={box}")
        password = secrets.token_urlsafe(18)  # 144 bits; typeable on a printer's panel
        out.append(configfile.NewAccount(device, box, device, hash_password(password)))
        passwords.append((device, password))
        taken.add(device)
    for net, box in plan.trusted:
        label = "network-" + net.replace("/", "-").replace(":", "-")
        if label in taken:
            raise UsageError(f"an account for {net} exists already")
        out.append(configfile.NewAccount(label, box, networks=(net,)))
        taken.add(label)
    return out, passwords


def _app_files(plan: Plan, folder: Path, raw: dict[str, Any] | None) -> tuple[Path, Path]:
    if not plan.new_app and raw is not None:
        cert = (raw["apps"][plan.app] or {}).get("certificate") or {}
        key_ref, cert_ref = cert.get("private_key"), cert.get("certificate")
        refs = [r.get("file") if isinstance(r, dict) else r for r in (key_ref, cert_ref)]
        paths = [Path(r) for r in refs if isinstance(r, str)]
        if len(paths) != 2:
            raise UsageError(f"apps.{plan.app} has no PEM certificate files; init writes the setup "
                             "scripts only for certificate apps (edit the config by hand)")
        key, cert_file = (p if p.is_absolute() else folder / p for p in paths)
        return key, cert_file
    return folder / f"{plan.app}-app.key", folder / f"{plan.app}-app.crt"


def _apply(args: argparse.Namespace, plan: Plan, path: Path, raw: dict[str, Any] | None) -> int:
    # cryptography (~20 MB) only when init runs, not when `m365relay --help` lists commands.
    from relay.setup import certs, scripts

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    accounts, passwords = _accounts(plan, raw)
    key_path, cert_path = _app_files(plan, folder, raw)
    made: list[Path] = []
    try:
        if plan.new_app and not (key_path.exists() and cert_path.exists()):
            certs.create_app_certificate(key_path, cert_path, app_name=plan.app)
            made += [key_path, cert_path]
        cert = certs.describe(cert_path, key_path)
        text = _config_text(args, plan, path, raw, accounts=accounts, key_path=key_path,
                            cert_path=cert_path, made=made)
        _check(text, path, raw)
    except BaseException:
        for created in made:
            created.unlink(missing_ok=True)
        raise
    configfile.write_atomically(path, text, backup=raw is not None)
    if args.group is not None:
        _share_with_group(args.group, [path, key_path, *made])
    merged = yaml.safe_load(text)
    client_id = str(merged["apps"][plan.app]["client_id"])
    written = scripts.write(folder, scripts.ScriptInputs(
        app_name=plan.app, tenant=plan.tenant, client_id=client_id, cloud=plan.cloud,
        hve=plan.hve, transport=plan.transport, grant=plan.grant,
        mailboxes=tuple(answers.app_mailboxes(merged, plan.app)), certificate=cert,
        config_path=path))
    _report(plan, path, made=made, written=written, cert=cert, passwords=passwords,
            client_id=client_id, group=args.group)
    return 0


def _share_with_group(group: str, files: list[Path]) -> None:
    """root:GROUP 0640 for what holds secrets (config, keys); certificates stay 0644."""
    gid = grp.getgrnam(group).gr_gid
    for item in dict.fromkeys(files):
        os.chown(item, -1, gid)
        if item.stat().st_mode & 0o777 == 0o600:
            item.chmod(0o640)


def _config_text(args: argparse.Namespace, plan: Plan, path: Path, raw: dict[str, Any] | None,
                 *, accounts: list[configfile.NewAccount], key_path: Path, cert_path: Path,
                 made: list[Path]) -> str:
    folder = path.parent
    app = None
    if plan.new_app:
        app = configfile.NewApp(plan.app, plan.tenant,
                                plan.client_id or configfile.PLACEHOLDER_CLIENT_ID,
                                _file_ref(key_path, folder), _file_ref(cert_path, folder),
                                plan.cloud, plan.hve, plan.transport)
    if raw is not None or app is None:
        return configfile.merge(path.read_text(encoding="utf-8"), app=app, accounts=accounts,
                                app_name=plan.app,
                                client_id=None if plan.new_app else plan.client_id)
    listener = _listener(args, plan, folder, made)
    return configfile.render_config(listener=listener, app=app, accounts=accounts,
                                    spool=plan.spool)


def _listener(args: argparse.Namespace, plan: Plan, folder: Path,
              made: list[Path]) -> configfile.NewListener:
    cert = key = None
    if plan.tls != "none":
        if args.tls_cert and args.tls_key:
            cert, key = str(args.tls_cert.absolute()), str(args.tls_key.absolute())
        else:
            key_path, cert_path = folder / "listener.key", folder / "listener.crt"
            if not (key_path.exists() and cert_path.exists()):
                host = plan.listen.rpartition(":")[0].strip("[]")
                names = [socket.getfqdn(), "localhost", "127.0.0.1"]
                if host not in ("0.0.0.0", "::", *names):  # noqa: S104 - comparing
                    names.append(host)
                from relay.setup.certs import create_listener_certificate

                create_listener_certificate(key_path, cert_path, tuple(names))
                made += [key_path, cert_path]
            cert, key = _file_ref(cert_path, folder), _file_ref(key_path, folder)
    # Passwords in clear only when asked for no TLS while devices log in (old firmware).
    cleartext = plan.tls == "none" and bool(plan.devices)
    return configfile.NewListener(plan.listen, plan.tls, tuple(plan.networks), cert, key,
                                  cleartext)


def _check(text: str, path: Path, raw: dict[str, Any] | None) -> None:
    """The relay's own loader must accept the new text (problems an existing config already
    had, such as an {env: ...} not set on this host, are not init's to fix)."""
    from relay.config import records as config_mod

    def problems(data: Any) -> list[str]:
        try:
            config_mod.parse(data, source=str(path), base_dir=path.parent)
        except config_mod.ConfigError as exc:
            return exc.problems
        return []

    new = set(problems(yaml.safe_load(text)))
    if raw is not None:
        new -= set(problems(raw))
    if new:
        raise configfile.MergeError("the config init would write does not pass check-config, so "
                                    "nothing was written:\n  " + "\n  ".join(sorted(new)))


def _report(plan: Plan, path: Path, *, made: list[Path], written: list[Path],
            cert: CertificateFiles, passwords: list[tuple[str, str]],
            client_id: str, group: str | None) -> None:
    print(f"\nWrote {path} (mode {path.stat().st_mode & 0o777:04o}); check it any time with "
          f"`m365relay check-config {path}`.")
    for item in made:
        print(f"  {item} (mode {item.stat().st_mode & 0o777:04o})")
    for item in written:
        print(f"  {item}")
    print(f"\nApp certificate {cert.cert}, valid until {cert.not_after:%Y-%m-%d}:")
    print(f"  thumbprint (SHA-1, as Entra shows it): {cert.sha1_thumbprint}")
    print(f"  x5t#S256:                              {cert.x5t_s256}")
    if passwords:
        print("\nDevice passwords, shown this once (only their argon2 hashes are stored):")
        for device, password in passwords:
            print(f"  {device}: username {device}  password {password}")
    steps = [f"An admin runs {written[0].name} (PowerShell) or {written[1].name} (az CLI); "
             "both are safe to run again."]
    if client_id == configfile.PLACEHOLDER_CLIENT_ID:
        steps.append(f"m365relay init --config {path} --app {plan.app} --client-id <the "
                     "Application (client) ID the script prints>")
    steps += [f"m365relay doctor --config {path} --send-to you@yourdomain",
              f"m365relay serve --config {path}"]
    print("\nNext:")
    for number, step in enumerate(steps, 1):
        print(f"  {number}. {step}")
    if group is None:
        print("  The relay's user must be able to read the config and the keys: run init with "
              "--group m365relay (the packaged layout) or chown them.")
