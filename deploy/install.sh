#!/usr/bin/env bash
# Install tlsroll on a server node (Debian 12 or Ubuntu 24.04), as root.
#
#   install.sh leader [--address IP] [--node-name NAME] [--python PYTHON] [--restart-later] [--check-only]
#   install.sh agent  [--server-config-dir DIR] [--python PYTHON] [--restart-later] [--check-only]
#   install.sh ca-credential [--passphrase-out FILE]
#   install.sh uninstall [--purge [--yes]]
#
# From a release bundle (`make dist`: this script beside wheels/) it installs offline; from a
# checkout (deploy/install.sh) pip fetches the dependencies from PyPI. What it writes:
#   /opt/tlsroll                      the virtual environment (and installed-files, see below)
#   /usr/lib/systemd/system/tlsroll-{leader,agent}.service
#   /usr/share/doc/tlsroll/           README.md, docs/*.md and the example agent config
#   /usr/local/bin/tlsroll            a link to the admin command
#   /etc/tlsroll/agent.toml           (agent) from the example, only if there is none
#   /var/lib/tlsroll                  (leader) the data dir, owned by the user tlsroll, 0750
#   /var/lib/tlsroll-agent            (agent) the agent's data dir, 0700
# A file it shipped is replaced on a re-run only while it is unchanged (its checksum is in
# /opt/tlsroll/installed-files); a changed one is kept and the new version put beside it as
# FILE.tlsroll-new. Local changes to a unit belong in a drop-in (`systemctl edit tlsroll-agent`).
# `ca-credential` (after `tlsroll init`) moves the CA passphrase out of the data dir into a
# systemd credential encrypted for this machine (its host key, and its TPM2 when it has one, not
# bound to its PCRs) and shows the passphrase once: on a terminal, or in a new file that
# --passphrase-out names (never into a pipe or a log).
# `uninstall` removes the units, the venv, the docs and the link, and keeps config and data
# (/etc/tlsroll, /var/lib/tlsroll*, drop-ins, the user tlsroll) unless --purge is given. It is
# refused (nothing removed) while the leader runs here with a node of a rollout on its way, and
# --purge of a leader's data dir (the cluster CA) or an agent's (its journal: the way back of a
# switch) wants --yes, or "purge" typed on a terminal.
#
# Run again to upgrade: the new version replaces the old one in /opt/tlsroll, and the daemons
# that run from it (the leader and the agent share it; read again just before the swap, one
# starting counts) are stopped before the swap and started after it, so that no old process goes
# on beside new files (it would import them when it next loads a module lazily, and start its
# children from them). The new virtual environment is built beside the live one
# (/opt/tlsroll.new), checked, and put in its place by renames; the one it replaces is kept as
# /opt/tlsroll.old until the next run has built and checked its own (a run cut short between the
# two renames, a power loss, leaves no /opt/tlsroll: the next run renames /opt/tlsroll.old back
# first). A failure on the way (a full disk) leaves /opt/tlsroll as it was; so does too little
# space, which is refused before anything is built. /opt/tlsroll may not be a mount point (a
# rename cannot move it).
# Not while a node of a rollout is on its way: the running leader is asked first (`tlsroll
# schema show --all`) and the upgrade refused; a rollout that awaits finalize, one paused with
# no node on its way, and a finalize --when-quiet waiting for quiet nodes are no obstacle (the
# leader's restart is safe there: it goes on where it was). --restart-later installs anyway
# and holds back only the leader's restart (restart it once no node is on its way); the agent
# is restarted at once. The check is made again after the build, just before the swap (a
# rollout auto_rotate started meanwhile). Never over a newer install: a store whose schema is
# newer than this tlsroll knows (the leader's, the agent's journal) is refused before anything
# is built ("Downgrading tlsroll" in README says why). --check-only makes these checks and stops:
# nothing is built or changed. Every unit is restarted even if another one fails to; each
# failure is reported, and the run exits 1.
set -euo pipefail
umask 022

VENV=/opt/tlsroll
NEW_VENV=$VENV.new # built here, then renamed to $VENV
OLD_VENV=$VENV.old # the one it replaced, until the next run has built its own
MANIFEST=$VENV/installed-files
UNIT_DIR=/usr/lib/systemd/system
ETC_UNIT_DIR=/etc/systemd/system
DOC_DIR=/usr/share/doc/tlsroll
CONF_DIR=/etc/tlsroll
LINK=/usr/local/bin/tlsroll
LEADER_DATA=/var/lib/tlsroll
AGENT_DATA=/var/lib/tlsroll-agent
CA_CREDENTIAL=/etc/tlsroll/credstore.encrypted/tlsroll-ca-passphrase
# The newest schema (PRAGMA user_version) of each store this tlsroll knows: the number of
# migrations of leader/db.py and of nodeagent/journal.py (tests/test_install_upgrades.py keeps
# these in step with them). A newer store was written by a newer tlsroll: not installed over.
KNOWN_SCHEMAS="leader.sqlite3 20
journal.sqlite3 6"
# sha256 of every unit file the earlier installer copied to /etc/systemd/system: such a copy
# is ours and unchanged, so it may go (it would shadow the unit in /usr/lib).
LEGACY_UNITS="7fae2a94454ca85bd2d9768b168e44c36d77d56e323b8571f213d3aaad3dea01
9e0f56aab23a3f56a13aa5dce01e1b409ef3237acb40a96d7a423391aad42543
c0c6a7a7a917d9be47f9393b02551e2b0dbacd03ad374c1a49e392ac15cf7092
fc08deb3ad7499b4c9be16b3251867ae727d89ca66dcf9c160383c1a86529669"

USAGE="usage: install.sh leader [--address IP] [--node-name NAME] [--python PYTHON] [--restart-later] [--check-only]
       install.sh agent [--server-config-dir DIR] [--python PYTHON] [--restart-later] [--check-only]
       install.sh ca-credential [--passphrase-out FILE]
       install.sh uninstall [--purge [--yes]]"

usage_error() {
    echo "install.sh: $1" >&2
    echo "$USAGE" >&2
    exit 2
}
discard_new=no # yes once the new venv is built and not yet in place: a refusal removes it
discard_out="" # ca-credential's --passphrase-out once written, while nothing else has changed
die() {
    if [ "$discard_new" = yes ]; then rm -rf "$NEW_VENV"; fi
    if [ -n "$discard_out" ]; then rm -f "$discard_out"; fi
    echo "install.sh: $1" >&2
    exit 1
}
warn() { echo "install.sh: warning: $1" >&2; }
say() { echo "install.sh: $1"; }

# --- arguments: all of them are checked before anything is changed ---------------------------
[ $# -gt 0 ] || usage_error "name a role: leader or agent (or ca-credential, uninstall)"
role=$1
shift
case "$role" in
    leader | agent | ca-credential | uninstall) ;;
    -h | --help)
        echo "$USAGE"
        exit 0
        ;;
    *) usage_error "unknown role '$role' (leader, agent, ca-credential or uninstall)" ;;
esac
python=python3
address=""
node_name=""
server_config_dir=""
purge=no
yes=no
restart_later=no
check_only=no
passphrase_out=""
while [ $# -gt 0 ]; do
    opt=$1
    case "$role:$opt" in
        leader:--address | leader:--node-name | leader:--python | agent:--python | agent:--server-config-dir | ca-credential:--passphrase-out)
            [ $# -ge 2 ] && [ -n "$2" ] || usage_error "$opt needs a value"
            case "$opt" in
                --passphrase-out) passphrase_out=$2 ;;
                --address) address=$2 ;;
                --node-name) node_name=$2 ;;
                --python) python=$2 ;;
                --server-config-dir) server_config_dir=$2 ;;
            esac
            shift 2
            ;;
        uninstall:--purge)
            purge=yes
            shift
            ;;
        uninstall:--yes)
            yes=yes
            shift
            ;;
        leader:--restart-later | agent:--restart-later)
            restart_later=yes
            shift
            ;;
        leader:--check-only | agent:--check-only)
            check_only=yes
            shift
            ;;
        *) usage_error "unknown option '$opt' for '$role'" ;;
    esac
done
if [ -n "$node_name" ] && ! [[ $node_name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; then
    usage_error "--node-name '$node_name': lowercase letters, digits and '-', at most 63"
fi
if [ -n "$address" ] && ! [[ $address =~ ^[0-9a-fA-F:.]+$ ]]; then
    usage_error "--address '$address' is not an IP address"
fi
# An IPv4 address is four numbers 0-255 written plainly, as ``tlsroll init`` takes it (999.1.1.1
# or 1.2.3 installed, and the init command printed then was refused: review s63 ops L1).
if [ -n "$address" ] && [[ $address != *:* ]] &&
    ! [[ $address =~ ^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$ ]]; then
    usage_error "--address '$address' is not an IPv4 address (four numbers 0-255, e.g. 192.168.1.5)"
fi
# What ``tlsroll init`` refuses too (tlsroll/names.py ip_problem): say it before installing.
case "${address,,}" in
    0.0.0.0 | :: | 127.0.0.1 | ::1 | 255.255.255.255)
        usage_error "--address '$address' names every host (or none), not this one" ;;
    22[4-9].* | 23[0-9].* | ff*:* | 169.254.* | fe[89ab]?:*)
        usage_error "--address '$address' is not the address of one host" ;;
esac
if [ "$role" = uninstall ] && [ "$yes" = yes ] && [ "$purge" = no ]; then
    usage_error "--yes goes with --purge (uninstall without --purge deletes no data and asks nothing)"
fi
# What systemd would read otherwise in the drop-in's ReadWritePaths=: a space splits the path,
# quotes and '\' are unquoted, '%h' becomes /root and '%x' makes the line void (session 67);
# any other control character (\x01, DEL) went into the unit file as it was (review s67 L).
# C1 controls (U+0080-U+009F, \xc2\x80-\xc2\x9f in UTF-8) too: [:cntrl:] holds them only in a
# UTF-8 locale, and in the C locale they passed (session 68); and bytes that are no UTF-8 at all
# (a lone Latin-1 C1 byte such as \x85, an overlong form, a surrogate: session 70), which
# systemd would refuse or read otherwise. Whether $1 is anything but UTF-8 text without a C0 or
# C1 control or DEL (RFC 3629's well-formed sequences), matched as bytes, in a subshell.
not_clean_text() (
    LC_ALL=C
    t=$'[\x80-\xbf]'
    utf8="[^"$'\x01-\x1f\x7f\x80-\xff'"]|"$'\xc2[\xa0-\xbf]|[\xc3-\xdf]'"$t|"
    utf8+=$'\xe0[\xa0-\xbf]'"$t|"$'[\xe1-\xec\xee\xef]'"$t$t|"$'\xed[\x80-\x9f]'"$t|"
    utf8+=$'\xf0[\x90-\xbf]'"$t$t|"$'[\xf1-\xf3]'"$t$t$t|"$'\xf4[\x80-\x8f]'"$t$t"
    ! [[ $1 =~ ^($utf8)*$ ]]
)
if [ -n "$server_config_dir" ] && { [[ $server_config_dir != /* || $server_config_dir =~ [[:space:][:cntrl:]\"\'\\%] ]] || not_clean_text "$server_config_dir"; }; then
    usage_error "--server-config-dir must be an absolute path of UTF-8 text without spaces, control characters, quotes, '\\' or '%'"
fi
if [ -n "$server_config_dir" ]; then
    # The drop-in makes this directory writable to the root agent (ReadWritePaths=): a system
    # directory, or tlsroll's own, would lift the sandbox's read-only system (ReadWritePaths=/
    # lifts all of it; /etc holds shadow, sudoers, the units; /usr/bin, /etc/profile.d or
    # /etc/apt/apt.conf.d run what is written there as root). Judged by where the path leads
    # (realpath: /var/run is /run, /lib /usr/lib on a merged /usr), not as written (review s63
    # ops M2 and the session's closing review). A deny-list: it cannot know every directory
    # of the system, so README says to name the managed server's own.
    if [[ $server_config_dir =~ (^|/)\.\.?(/|$) || $server_config_dir == *//* ]]; then
        usage_error "--server-config-dir '$server_config_dir': write the path plainly (no '.', '..' or '//')"
    fi
    scd=$(realpath -m -- "$server_config_dir" 2>/dev/null) || scd=/
    refuse_scd() {
        usage_error "--server-config-dir '$server_config_dir'${1:+ ($1)} is a system directory or tlsroll's own: the agent may write in it; name the managed server's own config directory, e.g. /etc/praxis"
    }
    [ "$scd" = "$server_config_dir" ] || [ "$scd" = "${server_config_dir%/}" ] || shown_scd=$scd
    case "$scd" in
        / | /etc | /var | /var/lib | /var/log | /var/cache | /var/tmp | /var/local | /var/opt | \
            /var/mail | /opt | /srv | /home | /tmp | /mnt | /media)
            refuse_scd "${shown_scd:-}" ;;
    esac
    case "$scd/" in
        /usr/* | /bin/* | /sbin/* | /lib/* | /lib32/* | /lib64/* | /libx32/* | /boot/* | \
            /dev/* | /proc/* | /sys/* | /run/* | /var/run/* | /var/spool/* | /var/lib/dpkg/* | \
            /var/lib/apt/* | /var/lib/systemd/* | /root/* | /etc/tlsroll*/* | \
            /var/lib/tlsroll*/* | /opt/tlsroll*/*)
            refuse_scd "${shown_scd:-}" ;;
        /etc/systemd/* | /etc/sudoers* | /etc/pam.d/* | /etc/ssh/* | /etc/cron* | /etc/anacrontab* | \
            /etc/security/* | /etc/profile* | /etc/bash* | /etc/environment* | /etc/ld.so.* | \
            /etc/apt/* | /etc/dpkg/* | /etc/default/* | /etc/init.d/* | /etc/rc*.d/* | \
            /etc/udev/* | /etc/modprobe.d/* | /etc/modules-load.d/* | /etc/polkit-1/* | \
            /etc/tmpfiles.d/* | /etc/sysctl.d/* | /etc/sysusers.d/* | /etc/dbus-1/* | \
            /etc/logrotate.d/* | /etc/rsyslog.d/* | /etc/network/* | /etc/NetworkManager/* | \
            /etc/apparmor* | /etc/selinux/* | /etc/ssl/* | /etc/ca-certificates* | \
            /etc/alternatives/* | /etc/xdg/* | /etc/X11/* | /etc/grub.d/* | /etc/kernel/* | \
            /etc/initramfs-tools/* | /etc/update-motd.d/* | /etc/skel/* | /etc/sudo* | \
            /etc/passwd* | /etc/shadow* | /etc/group* | /etc/gshadow*)
            refuse_scd "${shown_scd:-}" ;;
    esac
fi

[ "$(id -u)" = 0 ] || die "run me as root (Debian has no sudo by default: su - -c '$0 $role ...')"

here=$(cd "$(dirname "$0")" && pwd)
if [ -d "$here/wheels" ]; then
    bundle=yes # a release bundle from `make dist`: everything is beside this script
    readme=$here/README.md
    docs=$here/docs
else
    bundle=no # a checkout: deploy/install.sh
    readme=$here/../README.md
    docs=$here/../docs
fi
units=$here/systemd
examples=$here/examples

sha256() { sha256sum "$1" | cut -d' ' -f1; }
systemd_running() { [ -d /run/systemd/system ]; }
# write_whole FILE MODE TEXT: FILE holds TEXT, whole, or is left as it was (status 1). Written
# to a temporary file beside it, read back, then renamed over it.
write_whole() {
    local file=$1 mode=$2 text=$3 tmp
    tmp=$(mktemp "$file.XXXXXX" 2>/dev/null) || return 1
    if printf '%s' "$text" >"$tmp" 2>/dev/null && printf '%s' "$text" | cmp -s - "$tmp" &&
        chmod "$mode" "$tmp" && mv -f "$tmp" "$file"; then
        return 0
    fi
    rm -f "$tmp"
    return 1
}

# --- the running daemons, and whether a rollout is in the way --------------------------------
# An upgrade restarts each one that runs, uninstall stops them: not the leader while a node of
# a rollout is on its way (below, and "an upgrade" further on).
# read_units: running, the units systemd runs or is starting ("activating": also one that waits
# to be restarted after it failed), each stopped for the swap and started after it; up, those
# of them that run (the leader is asked only then); starting, those that were only starting
# (started again after the swap without waiting: an agent that cannot reach its leader yet
# stays "activating" for minutes, and a blocking start waited for all of it, then counted it
# failed, review s48rev4 M2). Read at the start and again just before the swap (review s47rev2
# L2: one started meanwhile ran the old code over the new files).
read_units() {
    local unit state
    running=""
    up=""
    starting=""
    if systemd_running; then
        for unit in tlsroll-leader tlsroll-agent; do
            state=$(systemctl is-active "$unit.service" 2>/dev/null) || true
            case "$state" in
                active | reloading | refreshing)
                    running="$running $unit"
                    up="$up $unit"
                    ;;
                activating)
                    running="$running $unit"
                    starting="$starting $unit"
                    ;;
            esac
        done
    fi
    running=${running# }
    up=${up# }
    starting=${starting# }
}
read_units
if [ "$role" = uninstall ]; then
    anyway="(to uninstall anyway: systemctl stop tlsroll-leader first)"
else
    anyway="(--restart-later installs without restarting it)"
fi
# rollouts_in_the_way: whether the running leader may be restarted now. Prints "quiet WHAT" (no
# node of a rollout on its way; WHAT: the rollouts not ended, if any, e.g. one awaiting
# finalize) or "busy WHAT"; dies if the leader cannot be asked. Every rollout not ended is
# looked at (what the leader considers active), not only the newest: a finalize that halted is
# newer than the phase 1 it finalizes, which still awaits finalize.
rollouts_in_the_way() {
    local errors answer asked problem
    errors=$(mktemp)
    answer=$(timeout 60 "$VENV/bin/tlsroll" schema show --all --json 2>"$errors") && asked=0 || asked=$?
    problem=$(grep -v '^ *$' "$errors" | tail -n 1 || true)
    rm -f "$errors"
    [ "$asked" = 0 ] ||
        die "cannot ask the running tlsroll-leader whether a rollout is active (${problem:-tlsroll schema show exited $asked}); nothing changed $anyway"
    "$VENV/bin/python" -c 'import json, sys
ENDED = {"completed", "halted", "aborted"}
ON_ITS_WAY = {"preflight", "staging", "staged", "switching", "confirming"}
busy, quiet = [], []
for r in json.load(sys.stdin).get("rollouts", []):
    rid, state = r["id"], r["state"]
    if state in ENDED:
        continue
    moving = ", ".join(sorted(n["name"] for n in r.get("nodes", []) if n.get("state") in ON_ITS_WAY))
    if state == "awaiting_finalize":
        quiet.append(f"rollout {rid} awaits finalize")
    elif state == "paused" and not moving:
        quiet.append(f"rollout {rid} is paused with no node on its way")
    elif state == "running" and r.get("when_quiet_seconds") and not moving:
        quiet.append(f"rollout {rid} (finalize --when-quiet) waits for quiet nodes")
    else:
        busy.append(f"rollout {rid} is {state}" + (f" ({moving} on its way)" if moving else ""))
print("busy" if busy else "quiet", "; ".join(busy or quiet))' <<<"$answer" 2>/dev/null ||
        die "cannot read the running leader's answer to tlsroll schema show --all --json; nothing changed $anyway"
}
# check_rollouts WHEN: refuse (nothing changed) if the leader would be restarted (uninstall:
# stopped) while a node of a rollout is on its way; say so if a rollout not ended is no obstacle.
check_rollouts() {
    local found
    if [ "$restart_later" = yes ]; then return 0; fi
    if [[ " $starting " == *" tlsroll-leader "* ]]; then
        # Starting: it cannot be asked yet, and stopping it unasked could stop a rollout it
        # resumes (review s48rev4 L1).
        die "tlsroll-leader is starting$1: it cannot be asked yet whether a node of a rollout is on its way; nothing changed. Run again once it is up (systemctl is-active tlsroll-leader), or stop it first (systemctl stop tlsroll-leader) $anyway"
    fi
    if [[ " $up " != *" tlsroll-leader "* ]]; then return 0; fi
    found=$(rollouts_in_the_way) || exit 1 # it said why
    case "$found" in
        busy\ *)
            if [ "$role" = uninstall ]; then
                die "${found#busy }: uninstalling now would stop tlsroll-leader in its course; nothing removed. Wait until no node is on its way (tlsroll rollout status)"
            fi
            die "${found#busy }$1: an upgrade now would restart tlsroll-leader in its course; nothing changed. Wait until no node is on its way (tlsroll rollout status), or run again with --restart-later (the agent is restarted, the leader only once you restart it: systemctl restart tlsroll-leader)"
            ;;
        "quiet ") ;;
        *)
            if [ "$role" = uninstall ] && [ "$purge" = yes ]; then
                # Not "it stays so": its store is about to go (review s47rev2 L4).
                say "${found#quiet }: --purge deletes it with the leader's store (its nodes stay as they are; no tlsroll can finalize it or take it back then)"
            elif [ "$role" = uninstall ]; then
                say "${found#quiet }: it stays so while tlsroll is not installed"
            else
                say "${found#quiet }: the leader's restart is safe there (it goes on where it was)"
            fi
            ;;
    esac
}

# --- ca-credential ---------------------------------------------------------------------------
# The passphrase file becomes a credential only this machine can decrypt; systemd decrypts it
# at each start of the leader (LoadCredentialEncrypted=) and a root ExecStartPre= copies it to
# /run/tlsroll (tmpfs, the leader's alone, removed when it stops), where leader.toml then
# points. Why the copy: the leader refuses a secret file it does not own, and newer systemd
# (Ubuntu 24.04's 255) leaves a credential owned by root with an ACL for the service's user.
# The credential is named tlsroll-ca-passphrase, not ca-passphrase, so that a leader that looks
# for $CREDENTIALS_DIRECTORY/ca-passphrase itself takes the copy instead.
# With a TPM2, the credential is bound to the TPM2 but to none of its PCRs (--tpm2-pcrs=, empty;
# systemd-creds's default is PCR 7): PCR 7 changes with the Secure Boot state and its keys (a
# dbx update by fwupd, Secure Boot switched off in the firmware setup), and the leader would no
# longer start. The TPM2 still ties it to this machine's chip, the host key to its disk.
# The plaintext file is shredded: the passphrase is shown once, its only copy then. So it goes
# to a terminal only, or into a new 0600 file the admin names (--passphrase-out FILE); stdout
# that is a pipe or a file (`| tee install.log`, a provisioning tool that keeps its output)
# is refused before anything changes, rather than the passphrase left in a log or lost.
if [ "$role" = ca-credential ]; then
    config=$LEADER_DATA/leader.toml
    runtime_file=/run/tlsroll/ca-passphrase
    dropin=$ETC_UNIT_DIR/tlsroll-leader.service.d/ca-passphrase.conf
    [ -x "$VENV/bin/python" ] || die "tlsroll is not installed: run install.sh leader first"
    command -v systemd-creds >/dev/null || die "systemd-creds is missing (it needs systemd 250 or newer)"
    [ -f "$config" ] || die "no $config: run tlsroll init first (install.sh leader prints how)"
    passfile=$("$VENV/bin/python" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["leader"]["ca_passphrase_file"])' "$config") ||
        die "cannot read ca_passphrase_file from $config"
    if [ "$passfile" = "$runtime_file" ] && [ -f "$CA_CREDENTIAL" ] && [ -f "$dropin" ]; then
        say "the CA passphrase already is the credential $CA_CREDENTIAL"
        exit 0
    fi
    [ -s "$passfile" ] || die "$passfile (ca_passphrase_file in $config) is missing or empty"
    [ "$(grep -c '^ca_passphrase_file = ' "$config")" = 1 ] ||
        die "cannot find the line ca_passphrase_file = ... in $config"
    if [ -n "$passphrase_out" ]; then
        if [ -e "$passphrase_out" ] || [ -L "$passphrase_out" ]; then
            die "--passphrase-out $passphrase_out exists (it is never overwritten): name a new file; nothing changed"
        fi
        # Created new (noclobber: O_EXCL, no link followed), 0600, then filled and read back.
        if ! (umask 077 && set -C && : >"$passphrase_out") 2>/dev/null; then
            die "cannot create --passphrase-out $passphrase_out; nothing changed"
        fi
        discard_out=$passphrase_out
        { cat "$passfile" >"$passphrase_out" && cmp -s "$passfile" "$passphrase_out"; } 2>/dev/null ||
            die "cannot write --passphrase-out $passphrase_out (is its file system full?); nothing changed"
    elif ! [ -t 1 ]; then
        die "the CA passphrase is shown once, on a terminal only, and stdout is not one: run install.sh ca-credential on a terminal, or add --passphrase-out FILE (a new file, created 0600) to have it written there; nothing changed"
    fi
    errors=$(mktemp)
    install -d -m 0700 "$(dirname "$CA_CREDENTIAL")"
    if ! systemd-creds encrypt --name=tlsroll-ca-passphrase --tpm2-pcrs= "$passfile" "$CA_CREDENTIAL.tmp" 2>"$errors"; then
        cat "$errors" >&2
        rm -f "$CA_CREDENTIAL.tmp" "$errors"
        die "systemd-creds encrypt failed; nothing changed"
    fi
    rm -f "$errors"
    if ! systemd-creds decrypt --name=tlsroll-ca-passphrase "$CA_CREDENTIAL.tmp" - 2>/dev/null | cmp -s - "$passfile"; then
        rm -f "$CA_CREDENTIAL.tmp"
        die "the credential does not decrypt to the passphrase; nothing changed"
    fi
    chmod 0400 "$CA_CREDENTIAL.tmp"
    mv -f "$CA_CREDENTIAL.tmp" "$CA_CREDENTIAL"
    install -d -m 0755 "$(dirname "$dropin")"
    # Whole or not at all: a truncated ExecStartPre= line (a full /etc) must never be the unit's.
    write_whole "$dropin" 0644 "# Written by install.sh ca-credential: the CA passphrase comes from an encrypted credential.
[Service]
LoadCredentialEncrypted=tlsroll-ca-passphrase:$CA_CREDENTIAL
RuntimeDirectory=tlsroll
RuntimeDirectoryMode=0700
ExecStartPre=+/usr/bin/install -m 0400 -o tlsroll -g tlsroll %d/tlsroll-ca-passphrase $runtime_file
" || die "cannot write $dropin (is $(dirname "$dropin") full or read-only?); $config and $passfile are unchanged"
    # Beside it and renamed: a full file system leaves it as it was, and no temporary file.
    unrewritten="cannot rewrite $config (is $(dirname "$config") full or read-only?); it and $passfile are unchanged (run install.sh ca-credential again once it can be written)"
    tmp=$(mktemp "$config.XXXXXX" 2>/dev/null) || die "$unrewritten"
    if ! { sed "s|^ca_passphrase_file = .*|ca_passphrase_file = \"$runtime_file\"|" "$config" >"$tmp" &&
        chown --reference="$config" "$tmp" && chmod --reference="$config" "$tmp" &&
        mv -f "$tmp" "$config"; } 2>/dev/null; then
        rm -f "$tmp"
        die "$unrewritten"
    fi
    discard_out=""
    passphrase=$(cat "$passfile")
    shred -u "$passfile" 2>/dev/null || rm -f "$passfile"
    if systemd_running; then systemctl daemon-reload; fi
    say "the CA passphrase is now the credential $CA_CREDENTIAL, which only this machine can decrypt; $passfile is gone"
    echo
    echo "Keep the CA passphrase offline (a password safe, or on paper in the safe): a copy of"
    echo "$LEADER_DATA on another machine needs it to use the CA, and so does this machine once"
    echo "it cannot decrypt the credential (its TPM2 cleared or replaced, or"
    echo "/var/lib/systemd/credential.secret lost): the leader does not start then. The way back:"
    echo "the passphrase in a file (0600, owned by tlsroll), ca_passphrase_file in $config"
    echo "set to that file, then install.sh ca-credential again."
    if [ -n "$passphrase_out" ]; then
        echo "It is in $passphrase_out (0600), its only copy: keep it offline, then shred -u it."
    else
        echo "It is shown this once:"
        echo "  $passphrase"
    fi
    echo
    echo "next step (as root): systemctl enable tlsroll-leader && systemctl restart tlsroll-leader"
    exit 0
fi

# --- uninstall -------------------------------------------------------------------------------
if [ "$role" = uninstall ]; then
    # Nothing of tlsroll here (never installed, or uninstalled already): said, not "removed".
    found=""
    for path in "$VENV" "$NEW_VENV" "$OLD_VENV" "$DOC_DIR" "$UNIT_DIR/tlsroll-leader.service" "$UNIT_DIR/tlsroll-agent.service"; do
        if [ -e "$path" ] || [ -L "$path" ]; then found=yes; fi
    done
    # The command's link only if it is ours (one of another program is left, as install does).
    our_link=""
    if [ -L "$LINK" ] && [[ $(readlink "$LINK") == "$VENV"/* ]]; then our_link=yes found=yes; fi
    kept=""
    for path in "$CONF_DIR" "$LEADER_DATA" "$AGENT_DATA" "$ETC_UNIT_DIR/tlsroll-leader.service.d" "$ETC_UNIT_DIR/tlsroll-agent.service.d"; do
        if [ -e "$path" ]; then kept="${kept:+$kept, }$path"; fi
    done
    user=""  # what of the user is there: "the user tlsroll" (and its group), or its group alone
    if getent passwd tlsroll >/dev/null; then
        user="the user tlsroll"
    elif getent group tlsroll >/dev/null; then
        user="the group tlsroll"
    fi
    if [ -z "$found" ] && { [ "$purge" = no ] || { [ -z "$kept" ] && [ -z "$user" ]; }; }; then
        if [ -n "$kept" ] || [ -n "$user" ]; then
            say "tlsroll is not installed here; nothing removed (kept from before: ${kept:-}${kept:+${user:+, }}${user}; --purge removes them)"
        else
            say "tlsroll is not installed here; nothing removed"
        fi
        exit 0
    fi
    check_rollouts ""
    # The leader's data dir holds the cluster CA: without it no node gets a certificate again.
    # The agent's holds its journal: the managed server's config as it was before each switch,
    # the way back of a rollout awaiting finalize or taken back (review s47rev2 L4).
    deletes=""
    backup=""
    if [ "$purge" = yes ] && [ "$yes" = no ]; then
        if [ -n "$(ls -A "$LEADER_DATA" 2>/dev/null)" ]; then
            deletes="$LEADER_DATA: the cluster CA (its key) and the leader's store"
            backup="a backup first: tlsroll-leader --backup DIR"
        fi
        if [ -n "$(ls -A "$AGENT_DATA" 2>/dev/null)" ]; then
            deletes="${deletes:+$deletes, and }$AGENT_DATA: the agent's key and its journal (the server's config before each switch: the way back of a rollout awaiting finalize or taken back)"
        fi
    fi
    if [ -n "$deletes" ]; then
        deletes="--purge deletes $deletes"
        if [ -t 0 ] && [ -t 2 ]; then
            printf 'install.sh: %s%s. Type purge to go on: ' "$deletes" "${backup:+; $backup}" >&2
            answer=""
            read -r answer || true
            [ "$answer" = purge ] || die "not confirmed; nothing removed"
        else
            die "$deletes: give --yes too${backup:+ ($backup)}; nothing removed"
        fi
    fi
    if systemd_running; then
        for unit in tlsroll-leader.service tlsroll-agent.service; do
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        done
    fi
    if [ -f "$MANIFEST" ]; then
        while read -r _ path; do
            # What we wrote under /etc (a drop-in) is configuration: kept unless --purge.
            if [ "$purge" = yes ] || [[ $path != /etc/* ]]; then
                rm -f -- "$path" "$path.tlsroll-new"
            fi
        done <"$MANIFEST"
    fi
    if [ -n "$our_link" ]; then rm -f "$LINK"; fi
    # Our units, also without the list of what was installed (an install cut short): else each
    # uninstall after would find them and say "removed" again.
    rm -f "$UNIT_DIR/tlsroll-leader.service" "$UNIT_DIR/tlsroll-agent.service"
    rm -rf "$VENV" "$NEW_VENV" "$OLD_VENV" "$DOC_DIR"
    if [ "$purge" = yes ]; then
        # What was there, said as such (leftovers of an earlier uninstall: no program, no CA).
        what=""
        [ -z "$found" ] || what="tlsroll"
        [ ! -e "$CONF_DIR" ] || what="${what:+$what, }the configuration in $CONF_DIR"
        [ ! -e "$LEADER_DATA" ] || what="${what:+$what, }the leader's data (the cluster CA)"
        [ ! -e "$AGENT_DATA" ] || what="${what:+$what, }the agent's data (its journal)"
        [ -z "$user" ] || what="${what:+$what, }$user"
        rm -rf "$CONF_DIR" "$LEADER_DATA" "$AGENT_DATA" "$CA_CREDENTIAL" \
            "$ETC_UNIT_DIR/tlsroll-leader.service.d" "$ETC_UNIT_DIR/tlsroll-agent.service.d"
        if getent passwd tlsroll >/dev/null; then userdel tlsroll; fi
        if getent group tlsroll >/dev/null; then groupdel tlsroll; fi
        say "removed ${what:-the unit drop-ins}"
    else
        if [ -n "$kept" ] || [ -n "$user" ]; then
            say "removed tlsroll; kept ${kept:-}${kept:+${user:+, }}${user} (--purge removes them)"
        else
            say "removed tlsroll"
        fi
    fi
    if systemd_running; then systemctl daemon-reload; fi
    exit 0
fi

# --- checks: the system, Python and the bundle ------------------------------------------------
os_id=unknown
os_version=""
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    os_id=$(. /etc/os-release && echo "${ID:-unknown}")
    # shellcheck disable=SC1091
    os_version=$(. /etc/os-release && echo "${VERSION_ID:-}")
fi
case "$os_id:$os_version" in
    debian:12 | ubuntu:24.04) ;;
    *) warn "tested on Debian 12 and Ubuntu 24.04; this is $os_id $os_version: going on" ;;
esac
[ -d /usr/lib/systemd ] || die "systemd is not installed: tlsroll runs as systemd services"

command -v "$python" >/dev/null || die "no $python: install Python 3.11 or newer (apt-get install python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); tlsroll needs 3.11 or newer (--python PYTHON names another)"
pytag=$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
pyversion=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$python" -c 'import venv' 2>/dev/null || die "$python has no venv module"

if [ "$bundle" = yes ]; then
    bundle_pythons=$(sed -n 's/^pythons=//p' "$here/BUNDLE")
    bundle_machine=$(sed -n 's/^machine=//p' "$here/BUNDLE")
    [ "$bundle_machine" = "$(uname -m)" ] ||
        die "this bundle is for $bundle_machine, this machine is $(uname -m): run make dist on one like it"
    [[ " $bundle_pythons " == *" $pytag "* ]] ||
        die "this bundle has wheels for $bundle_pythons, $python is $pytag: run make dist DIST_PYTHONS=$pyversion"
    pip_wheel=$(find "$here/wheels" -maxdepth 1 -name 'pip-*.whl' | head -n 1)
    tlsroll_wheel=$(find "$here/wheels" -maxdepth 1 -name 'tlsroll-*.whl' | head -n 1)
    [ -n "$pip_wheel" ] && [ -n "$tlsroll_wheel" ] || die "$here/wheels lacks pip or tlsroll: a broken bundle"
else
    [ -f "$here/../pyproject.toml" ] || die "neither a bundle (wheels/) nor a checkout beside $0"
    warn "installing from a checkout: pip fetches the dependencies from PyPI (make dist builds an offline bundle)"
fi
if [ "$role" = leader ]; then
    command -v useradd >/dev/null || die "useradd is missing (Debian: apt-get install passwd)"
fi

# --- what an earlier run left ----------------------------------------------------------------
# A swap cut short between its two renames (a power loss) left no $VENV, the installed version
# as $OLD_VENV: it is put back first (review s38, M4: the next run failed, or with
# --restart-later removed it, the only intact venv and its manifest).
if [ "$check_only" = no ] && [ ! -e "$VENV" ] && [ ! -L "$VENV" ] && [ -d "$OLD_VENV" ]; then
    mv -T "$OLD_VENV" "$VENV" || die "cannot move $OLD_VENV back to $VENV; nothing else changed"
    say "$VENV was missing (an earlier run cut short in its swap): $OLD_VENV, the installed version, is back in its place"
fi
# The swap renames $VENV, which a mount point refuses (EBUSY): refused before anything changes.
if [ -d "$VENV" ] && command -v mountpoint >/dev/null && mountpoint -q "$VENV"; then
    die "$VENV is a mount point: an upgrade puts the new version in its place by renames, which a mount point refuses; unmount it (keep $VENV on the file system of $(dirname "$VENV")) and run again; nothing changed"
fi

# --- an upgrade: the daemons that run from $VENV, and whether they may be restarted -------------
# Each tlsroll daemon that runs is restarted after the install (the leader and the agent run from
# the same $VENV, whichever role is installed). The agent may be restarted at any time, also in
# the middle of a switch: its journal holds the transaction, and the new process resumes it
# where it was (the same path as a crash: the fault matrix and test_switch's agent killed after
# each phase cover it). The leader is not restarted while a node of a rollout is on its way,
# which an upgrade should not change in its course: it is asked first, with the tlsroll that
# runs it, and the install refused (nothing changed) unless --restart-later.
old_version=""
if [ -f "$MANIFEST" ] && [ -x "$VENV/bin/python" ]; then
    old_version=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("tlsroll"))' 2>/dev/null || echo unknown)
fi

# store_schema FILE: the schema (PRAGMA user_version) of the SQLite file and the lowest schema
# that may read it (its schema_floor table's readable_by, tlsroll/sqlite.py: a newer tlsroll's
# migrations an older one may ignore; else the schema itself), read without writing anything:
# by SQLite, read-only, while FILE-wal and FILE-shm are beside it (a daemon has it open: the
# -wal may hold a newer first page than the file), else from the file's header and, only when
# the schema is newer than this tlsroll's, by SQLite as an immutable file (opening it otherwise
# would create -wal and -shm, owned by root, which the leader, user tlsroll, could then not open).
store_schema() {
    "$python" - "$1" "$2" <<'PY'
import os, sqlite3, sys
from urllib.request import pathname2url

path, known = sys.argv[1], int(sys.argv[2])


def floor_of(db, version):
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_floor'"
    ).fetchone():
        return version
    # As tlsroll/sqlite.py's readable_by: exactly one row, an integer from 1 to version.
    try:
        rows = db.execute(
            "SELECT readable_by, typeof(readable_by) FROM schema_floor LIMIT 2"
        ).fetchall()
    except sqlite3.Error:
        return version
    if len(rows) == 1 and rows[0][1] == "integer" and 0 < rows[0][0] <= version:
        return rows[0][0]
    return version


if os.path.exists(path + "-wal") and os.path.exists(path + "-shm"):
    db = sqlite3.connect(f"file:{pathname2url(path)}?mode=ro", uri=True)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        print(version, floor_of(db, version) if version > known else version)
    finally:
        db.close()
else:
    with open(path, "rb") as f:
        head = f.read(100)
    if not head:
        print(0, 0)  # created, never written
    elif len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        sys.exit("not an SQLite database")
    else:
        version = int.from_bytes(head[60:64], "big")
        floor = version
        if version > known:
            db = sqlite3.connect(f"file:{pathname2url(path)}?mode=ro&immutable=1", uri=True)
            try:
                floor = floor_of(db, version)
            finally:
                db.close()
        print(version, floor)
PY
}

# Before anything is built: a store written by a newer tlsroll (an older bundle's install.sh
# run over a newer install) is refused, unless that tlsroll said this one may read it
# (readable_by); the older daemons would refuse it too (exit 3), but only after the swap, with
# the older version in place.
agent_data=$("$python" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["agent"]["data_dir"])' "$CONF_DIR/agent.toml" 2>/dev/null) || agent_data=$AGENT_DATA
for store in "$LEADER_DATA/leader.sqlite3" "$agent_data/journal.sqlite3"; do
    [ -f "$store" ] || continue
    known=$(awk -v name="${store##*/}" '$1 == name { print $2 }' <<<"$KNOWN_SCHEMAS")
    if ! found=$(store_schema "$store" "$known" 2>&1) || ! [[ $found =~ ^[0-9]+\ [0-9]+$ ]]; then
        warn "cannot read the schema of $store (${found##*$'\n'}): not compared with this tlsroll's"
        continue
    fi
    read -r version floor <<<"$found"
    if [ "$floor" -gt "$known" ]; then
        die "$store has schema $version, this tlsroll knows $known: a newer tlsroll wrote it, and this one's daemons would refuse it; keep the newer version or see README 'Downgrading tlsroll'; nothing changed"
    fi
done

check_rollouts ""
# What is restarted once installed (restart_now) and what --restart-later holds back (held):
# only the leader; the agent is restarted at once (old code must not go on over new files).
plan_restarts() {
    local unit
    restart_now=""
    held=""
    for unit in $running; do
        if [ "$unit" = tlsroll-leader ] && [ "$restart_later" = yes ]; then held=$unit; else restart_now="$restart_now $unit"; fi
    done
    restart_now=${restart_now# }
}
plan_restarts
if [ "$check_only" = yes ]; then
    would="install"
    if [ -n "$restart_now" ]; then would="$would and restart ${restart_now// /, }"; fi
    if [ -n "$held" ]; then would="$would, not restarting $held (--restart-later)"; fi
    if [ -z "$running" ]; then would="$would (no tlsroll daemon runs here)"; fi
    say "the checks pass: a run now would $would; nothing changed (--check-only)"
    exit 0
fi

# --- the virtual environment -------------------------------------------------------------------
manifest_get() { [ -f "$MANIFEST" ] && awk -v p="$1" '$2 == p { print $1 }' "$MANIFEST" || true; }
manifest_set() {
    local tmp="$MANIFEST.tmp"
    { [ -f "$MANIFEST" ] && awk -v p="$2" '$2 != p' "$MANIFEST"; echo "$1 $2"; } >"$tmp"
    mv -f "$tmp" "$MANIFEST"
}

# A new virtual environment, built beside the live one and checked before it takes its place:
# pip upgrading $VENV in place and failing part-way (a full disk) left a mix of two versions
# that the next start of a daemon ran (audit s38, M3).
kib_of() {
    local kib
    kib=$(du -sk "$1" 2>/dev/null | awk 'NR == 1 { print $1 }') || true
    echo "${kib:-0}"
}
rm -rf "$NEW_VENV" # what a run cut short left
if [ "$bundle" = yes ]; then
    need_kib=$((3 * $(kib_of "$here/wheels"))) # unpacked wheels take about 2-3 times their size
else
    need_kib=$((150 * 1024))
fi
if [ -d "$VENV" ] && [ "$(kib_of "$VENV")" -gt "$need_kib" ]; then need_kib=$(kib_of "$VENV"); fi
need_kib=$((need_kib + need_kib / 5))
free_kib=$(df -Pk "$(dirname "$VENV")" 2>/dev/null | awk 'NR == 2 { print $4 }') || free_kib=""
if [ -n "$free_kib" ] && [ "$free_kib" -lt "$need_kib" ]; then
    hint=""
    if [ -d "$OLD_VENV" ]; then hint=" ($OLD_VENV, the version before the installed one, may go: rm -rf $OLD_VENV)"; fi
    die "not enough space on $(dirname "$VENV"): $((free_kib / 1024)) MiB free, about $((need_kib / 1024)) MiB needed to build the new version beside the installed one; free space there$hint and run again; nothing changed"
fi
failed_build() {
    rm -rf "$NEW_VENV"
    die "$1; $VENV is unchanged${old_version:+ (tlsroll $old_version)} (is $(dirname "$VENV") full? df -h $(dirname "$VENV"))"
}
# Without pip: Debian's python3 lacks ensurepip unless python3-venv is installed. pip comes from
# the bundle (or, from a checkout, from ensurepip).
if [ "$bundle" = yes ]; then
    "$python" -m venv --without-pip "$NEW_VENV" || failed_build "$python -m venv $NEW_VENV failed"
    # Only the bundle's wheels: no index, no pip configuration or PIP_* variables of this host.
    pip() { PIP_CONFIG_FILE=/dev/null "$NEW_VENV/bin/python" "$pip_wheel/pip" --isolated --disable-pip-version-check "$@"; }
    pip install --quiet --no-compile --no-index --find-links "$here/wheels" "$pip_wheel" "$tlsroll_wheel" ||
        failed_build "pip could not install the bundle's wheels into $NEW_VENV"
else
    "$python" -m venv "$NEW_VENV" || failed_build "$python -m venv failed: apt-get install python3-venv"
    "$NEW_VENV/bin/python" -m pip install --quiet --no-compile --upgrade pip &&
        "$NEW_VENV/bin/python" -m pip install --quiet --no-compile "$here/.." ||
        failed_build "pip could not install tlsroll into $NEW_VENV"
fi
"$NEW_VENV/bin/tlsroll" --version >/dev/null 2>&1 || failed_build "$NEW_VENV/bin/tlsroll --version does not run"
# Its scripts name the interpreter by the path it was built at: from now on, $VENV's.
relocate() {
    local from_re files found file
    from_re=$(printf '%s' "$NEW_VENV" | sed 's/[][\.*^$|]/\\&/g')
    # grep -r follows no symbolic link (bin/python); 1: no file names it.
    files=$(grep -rlI --fixed-strings -- "$NEW_VENV" "$NEW_VENV/bin" "$NEW_VENV/pyvenv.cfg") && found=0 || found=$?
    [ "$found" -le 1 ] || return 1
    for file in $files; do
        sed -i "s|$from_re|$VENV|g" "$file" || return 1
    done
}
relocate || failed_build "cannot rewrite the scripts of $NEW_VENV for $VENV"
# Its byte code, compiled (again: the check above and ensurepip wrote some) with the paths it
# has once in place: a traceback names /opt/tlsroll/..., which exists, not /opt/tlsroll.new.
# TLSROLL_INSTALL_BYTECODE=no leaves it out (but for what the checks above wrote, which names
# $NEW_VENV): for tests/test_deploy.py's runs that check something else (it is about half of
# a run's CPU); a daemon then compiles what it imports.
if [ "${TLSROLL_INSTALL_BYTECODE:-yes}" != no ]; then
    "$NEW_VENV/bin/python" -m compileall -q -f -s "$NEW_VENV" -p "$VENV" "$NEW_VENV/lib" >/dev/null ||
        failed_build "cannot compile the byte code of $NEW_VENV (is $(dirname "$VENV") full?)"
fi
if [ -f "$MANIFEST" ]; then
    cp -p "$MANIFEST" "$NEW_VENV/installed-files" || failed_build "cannot copy $MANIFEST"
fi
# Again, just before the swap: a rollout may have started while the new version was built
# (auto_rotate starts one by itself). Refused, the new venv removed: nothing changed.
discard_new=yes
# Which daemons run, read again: one started while the new version was built (by hand, or by
# systemd after it failed) is stopped for the swap and started after it too.
read_units
plan_restarts
check_rollouts " (it started while the new version was built)"
discard_new=no
# The daemons that run from $VENV stop before the swap and start after it (review s46rt2 L2: a
# restart after the swap let the old agent finish its switch over the new files for up to 60 s,
# its lazy imports and every child it started, the crypto worker among them, the new version's).
# Whatever happens from here on, a daemon stopped here is started again on the way out (the old
# version, if the swap is undone); a unit that would not stop is restarted after the swap.
stopped=""
# start_unit UNIT [VERB]: started again; one that was only starting, without waiting for it.
start_unit() {
    if [[ " $starting " == *" $1 "* ]]; then
        systemctl start --no-block "$1.service"
    else
        systemctl "${2:-start}" "$1.service"
    fi
}
start_stopped() {
    local unit
    for unit in $stopped; do
        start_unit "$unit" || echo "install.sh: systemctl start $unit failed: see systemctl status $unit" >&2
    done
    stopped=""
}
trap start_stopped EXIT
rm -rf "$OLD_VENV" # (the version before the installed one: nothing runs from it)
if [ -n "$restart_now" ]; then
    say "stopping ${restart_now// /, } for the swap (an agent lets a switch under way end first: up to 60 s)"
fi
for unit in $restart_now; do
    # Counted as stopped before the stop returns: a run cut short during it (the agent's is the
    # long one, a dropped SSH session, Ctrl-C) starts it again on the way out (review s47rev2 M2).
    stopped="$stopped $unit"
    if ! systemctl stop "$unit.service"; then stopped=${stopped% "$unit"}; fi
done
# The swap: two renames (a daemon started between them fails and is started again by systemd).
if [ -d "$VENV" ]; then mv -T "$VENV" "$OLD_VENV" || failed_build "cannot move $VENV to $OLD_VENV"; fi
if ! mv -T "$NEW_VENV" "$VENV"; then
    if [ -d "$OLD_VENV" ]; then mv -T "$OLD_VENV" "$VENV"; fi
    failed_build "cannot move $NEW_VENV to $VENV"
fi
if ! "$VENV/bin/tlsroll" --version >/dev/null 2>&1; then
    mv -T "$VENV" "$NEW_VENV"
    if [ -d "$OLD_VENV" ]; then mv -T "$OLD_VENV" "$VENV"; fi
    failed_build "$VENV/bin/tlsroll does not run once in place; the installed version is back"
fi
if [ ! -e "$LINK" ] || { [ -L "$LINK" ] && [[ $(readlink "$LINK") == "$VENV"/* ]]; }; then
    mkdir -p "$(dirname "$LINK")"
    ln -sfn "$VENV/bin/tlsroll" "$LINK"
else
    warn "$LINK exists and is not ours: left alone (the command is $VENV/bin/tlsroll)"
fi

# --- files we ship: replaced only while unchanged ----------------------------------------------
# install_managed SRC DEST MODE
install_managed() {
    local src=$1 dest=$2 mode=$3 new current recorded
    new=$(sha256 "$src")
    if [ -e "$dest" ]; then
        current=$(sha256 "$dest")
        recorded=$(manifest_get "$dest")
        if [ "$current" = "$new" ]; then
            manifest_set "$new" "$dest"
            rm -f "$dest.tlsroll-new"
            return
        fi
        if [ "$current" != "$recorded" ]; then
            install -m "$mode" "$src" "$dest.tlsroll-new"
            warn "kept $dest: it was changed here; the new version is $dest.tlsroll-new (put local changes in a drop-in or config, then move it over)"
            return
        fi
    fi
    install -D -m "$mode" "$src" "$dest.tlsroll-tmp"
    mv -f "$dest.tlsroll-tmp" "$dest"
    manifest_set "$new" "$dest"
}

install_unit() {
    local unit=$1 old=$ETC_UNIT_DIR/$1
    install_managed "$units/$unit" "$UNIT_DIR/$unit" 0644
    if [ -f "$old" ] && [ ! -L "$old" ]; then
        if grep -qx "$(sha256 "$old")" <<<"$LEGACY_UNITS"; then
            rm -f "$old"
            say "removed $old, an unchanged copy from an earlier install (the unit is now in $UNIT_DIR)"
        else
            warn "$old overrides $UNIT_DIR/$unit and was changed here: move your changes into a drop-in (systemctl edit ${unit%.service}) and delete it"
        fi
    fi
}

# An existing config dir keeps its mode: a re-run must not undo an admin's tightening.
[ -d "$CONF_DIR" ] || install -d -m 0755 "$CONF_DIR"
install_managed "$readme" "$DOC_DIR/README.md" 0644
install_managed "$examples/agent.toml" "$DOC_DIR/examples/agent.toml" 0644
# The docs the README and the daemons' messages name (DOC_DIR/docs/ca-renewal.md, …).
for doc in "$docs"/*.md; do
    if [ -f "$doc" ]; then install_managed "$doc" "$DOC_DIR/docs/${doc##*/}" 0644; fi
done
if [ -d "$here/share" ]; then # man pages and shell completion, when the bundle has them
    while IFS= read -r -d '' file; do
        install_managed "$file" "/usr/share/${file#"$here/share/"}" 0644
    done < <(find "$here/share" -type f -print0)
fi

case "$role" in
    leader)
        install_unit tlsroll-leader.service
        if ! getent passwd tlsroll >/dev/null; then
            useradd --system --user-group --home-dir "$LEADER_DATA" --no-create-home \
                --shell /usr/sbin/nologin --comment "tlsroll leader" tlsroll
        fi
        # The data dir exists before the first start, so that `tlsroll init` can fill it.
        if [ ! -d "$LEADER_DATA" ]; then
            install -d -o tlsroll -g tlsroll -m 0750 "$LEADER_DATA"
        elif [ "$(stat -c %U "$LEADER_DATA")" != tlsroll ]; then
            chown tlsroll:tlsroll "$LEADER_DATA"
        fi
        ;;
    agent)
        install_unit tlsroll-agent.service
        install -d -m 0700 "$AGENT_DATA"
        if [ ! -e "$CONF_DIR/agent.toml" ]; then
            install -m 0600 "$examples/agent.toml" "$CONF_DIR/agent.toml"
        fi
        if [ ! -e "$CONF_DIR/join-token" ]; then
            install -m 0600 /dev/null "$CONF_DIR/join-token"
        fi
        if [ -n "$server_config_dir" ]; then
            [ -d "$server_config_dir" ] || warn "$server_config_dir does not exist (yet): the agent does not start without it"
            dropin=$ETC_UNIT_DIR/tlsroll-agent.service.d/server-config.conf
            tmp=$(mktemp)
            printf '# written by install.sh --server-config-dir: the managed server'"'"'s config dir\n[Service]\nReadWritePaths=%s\n' \
                "$server_config_dir" >"$tmp"
            install_managed "$tmp" "$dropin" 0644
            rm -f "$tmp"
        fi
        ;;
esac
if systemd_running; then
    systemctl daemon-reload
else
    warn "systemd is not running here: the units are installed but not loaded"
fi

version=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("tlsroll"))')
# Every unit is restarted, also after another one failed to be: one left on the old code (the
# leader node's agent) would run it over the new files; each failure is reported, exit 1.
restarted=""
not_restarted=""
for unit in $restart_now; do
    if [[ " $stopped " == *" $unit "* ]]; then verb=start; else verb=try-restart; fi
    if start_unit "$unit" "$verb"; then
        restarted="$restarted $unit"
    else
        echo "install.sh: systemctl $verb $unit failed: see systemctl status $unit" >&2
        not_restarted="$not_restarted $unit"
    fi
done
stopped="" # each one started (or tried) above: nothing left for the way out
restarted=${restarted# }
not_restarted=${not_restarted# }
if [ -n "$held" ]; then
    warn "not restarted ($held): it runs the old code beside the new files until it is; once no node of a rollout is on its way (tlsroll rollout status): systemctl restart $held"
fi
# An upgrade of a server that is set up already: what changed, instead of the first steps.
if [ -n "$old_version" ] && { { [ "$role" = leader ] && [ -f "$LEADER_DATA/leader.toml" ]; } ||
    { [ "$role" = agent ] && [ -f "$AGENT_DATA/node.pem" ]; }; }; then
    # Which way the version went, as the versions say (every build from a checkout says
    # 0.2.0.dev0: "reinstalled" there).
    how=$(
        "$VENV/bin/python" - "$old_version" "$version" 2>/dev/null <<'PY'
import sys
from pip._vendor.packaging.version import Version
old, new = (Version(v) for v in sys.argv[1:])
print("reinstalled" if old == new else "downgraded" if new < old else "upgraded")
PY
    ) || how=upgraded
    if [ "$how" = reinstalled ]; then what="reinstalled $version"; else what="$how $old_version -> $version"; fi
    if [ -z "$running" ]; then
        done_line="no tlsroll daemon runs here (systemctl start tlsroll-$role)"
    else
        done_line=""
        if [ -n "$restarted" ]; then done_line="restarted ${restarted// /, }"; fi
        if [ -n "$not_restarted" ]; then done_line="${done_line:+$done_line; }failed to restart ${not_restarted// /, }"; fi
        if [ -n "$held" ]; then done_line="${done_line:+$done_line; }not restarted: $held (--restart-later)"; fi
    fi
    say "$what; $done_line"
    if [ -n "$not_restarted" ]; then exit 1; fi
    exit 0
fi
if [ -n "$not_restarted" ]; then
    die "installed tlsroll $version in $VENV, but could not restart ${not_restarted// /, }: see systemctl status ${not_restarted// / }"
fi

# --- next steps, each a command that works as printed (as root) --------------------------------
say "installed tlsroll $version for the $role in $VENV"
if [ "$role" = leader ]; then
    if [ -z "$address" ]; then
        address=$(ip -o route get 192.0.2.1 2>/dev/null | sed -n 's/.* src \([^ ]*\).*/\1/p' || true)
    fi
    if [ -z "$node_name" ]; then
        node_name=$({ hostname -s 2>/dev/null || uname -n; } | tr 'A-Z_.' 'a-z--' | tr -cd 'a-z0-9-' | sed 's/^-*//; s/-*$//' | cut -c1-63 || true)
        [ -n "$node_name" ] || node_name=leader
    fi
    echo
    echo "next steps (as root):"
    if [ -z "$address" ]; then
        echo "  # no address found: put the address the workstations and agents use for this server instead of IP"
        address=IP
    fi
    echo "  runuser -u tlsroll -- $VENV/bin/tlsroll init --data-dir $LEADER_DATA --address $address --node-name $node_name"
    echo "  $here/install.sh ca-credential    # the CA passphrase out of $LEADER_DATA, encrypted for this machine"
    echo "  systemctl enable --now tlsroll-leader"
    echo "  tlsroll nodes"
    echo "  # this node also runs an agent (name it $node_name): install.sh agent"
else
    echo
    echo "next steps:"
    echo "  # on the leader: a join script for this node (it holds a secret token: made 0600, as README step 7)"
    echo "  (umask 077; tlsroll token create --node NAME --address IP --print-join-command > join-NAME.sh)"
    echo "  # here, as root: run it (the node's names, the leader's address and ca_pin, the token), then delete both copies"
    echo "  sh join-NAME.sh"
    echo "  # the [server] table for the managed server (a systemd or exec driver's template is yours to write)"
    echo "  editor $CONF_DIR/agent.toml"
    if [ -z "$server_config_dir" ]; then
        echo "  # the agent may write the managed server's config only under /etc/praxis; elsewhere: install.sh agent --server-config-dir DIR"
    fi
    echo "  systemctl enable --now tlsroll-agent"
    echo "  journalctl -u tlsroll-agent -f"
fi
