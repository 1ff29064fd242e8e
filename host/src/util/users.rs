//! Users and groups by name (a leaf: it imports nothing of the host).

/// A group's id by name (or a number).
pub(crate) fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).map_err(|_| "a group name cannot contain NUL".to_owned())?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero group is a valid value for getgrnam_r to fill in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name, the group, the buffer with its length, and
    // the result pointer; getgrnam_r writes only into them.
    let r = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() {
        return Err("no such group".to_owned());
    }
    Ok(grp.gr_gid)
}

/// A user's uid and primary gid by name (or `UID[:GID]` numbers), for `user`/`group`.
pub(crate) fn user_ids(user: &str, group: Option<&str>) -> Result<(u32, u32), String> {
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => {
            let c = std::ffi::CString::new(user).map_err(|_| format!("user {user:?}: contains NUL"))?;
            let mut buf = vec![0 as libc::c_char; 16 << 10];
            // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill in.
            let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the call and getpwnam_r writes only into them.
            let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
            if r != 0 || found.is_null() {
                return Err(format!("user {user:?}: no such user"));
            }
            (pw.pw_uid, pw.pw_gid)
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => group_id(g).map_err(|e| format!("group {g:?}: {e}"))?,
    };
    Ok((uid, gid))
}
