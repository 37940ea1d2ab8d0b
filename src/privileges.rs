//! Running as an unprivileged user once the configuration is read (issue 14 §1). The
//! container image starts the program as root with `PAHEKO_PUSH_RUN_AS=65532:65532`:
//! compose mounts a secret file as it is on the host (a root-owned 0600 file stays
//! that), and neither Docker Compose nor podman-compose applies a secret's `uid`,
//! `gid` or `mode` to such a file, so only root can read it. The program reads it, and
//! everything else the configuration names, then gives up root for good before it
//! opens a socket or starts a thread. It owns nothing else and never raises a
//! privilege: started as anyone but root it changes nothing.

/// Becomes `uid:gid` with no supplementary group, when running as root; otherwise
/// leaves the process as it is. Irreversible: root is not kept in the saved set-user-ID.
pub fn become_user((uid, gid): (u32, u32)) -> Result<(), String> {
    // SAFETY: these libc calls take plain integers (and a null list for no group)
    // and touch no memory of ours.
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(());
        }
        let failed = |call: &str| {
            format!(
                "PAHEKO_PUSH_RUN_AS={uid}:{gid}: {call} failed after reading the configuration \
                 as root ({}); a container needs the SETUID and SETGID capabilities for it \
                 (compose: cap_add: [SETUID, SETGID])",
                std::io::Error::last_os_error()
            )
        };
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(failed("setgroups"));
        }
        if libc::setgid(gid) != 0 {
            return Err(failed("setgid"));
        }
        if libc::setuid(uid) != 0 {
            return Err(failed("setuid"));
        }
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getegid() != gid {
            return Err(format!(
                "PAHEKO_PUSH_RUN_AS={uid}:{gid}: still uid {}, gid {} after setuid",
                libc::geteuid(),
                libc::getegid()
            ));
        }
    }
    Ok(())
}

/// What to add to "Permission denied" on a secret or CA file: who the program is.
pub fn unreadable_hint() -> String {
    // SAFETY: geteuid takes nothing and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        " (read as root without the capability to read other users' files, as in a \
         container with cap_drop: [ALL]: the file must belong to root, which is you under \
         rootless podman)"
            .to_string()
    } else {
        format!(
            " (this program runs as uid {euid}; in a container, start it as root with \
             PAHEKO_PUSH_RUN_AS, as the image does, rather than with a user: setting)"
        )
    }
}
