//! The file-system side of `vipgate sshd`'s unix socket forwards: binding a client's
//! `-R /path` listener and connecting its `-L ...:/path` target, once
//! [`crate::sockpath`] has admitted the text of the path.
//!
//! Semantics (OpenSSH's `StreamLocalBindUnlink`, made safe for a shared server): a path
//! whose directory chain holds a symlink is refused, and so is a path that is a symlink, a
//! regular file, a directory or anything else but a socket. An existing socket that some
//! process still accepts on, or that another forward of this server holds, is refused; a
//! stale one (connecting is refused: its server is gone) is replaced. The socket is bound
//! and given its mode before it listens, so nobody connects to it with a wider mode, and it
//! is removed when the forward ends (cancelled, or its session closed) if it is still the
//! file this forward created.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::lock;

/// Why a socket could not be bound or connected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketRefusal {
    /// A symlink in the directory chain (or at the path itself, for a connect).
    #[error("a symlink is on the way (resolves to {0})")]
    Symlink(PathBuf),
    /// Something other than a socket is at the path.
    #[error("a {0} is there, not a socket")]
    NotASocket(&'static str),
    /// A live socket is at the path.
    #[error("a socket in use is there")]
    InUse,
    /// The OS said no.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Paths this server's forwards hold now.
pub(crate) type HeldPaths = Arc<Mutex<HashSet<PathBuf>>>;

/// A socket file a forward created: removed on drop if it is still that file.
pub(crate) struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
    held: HeldPaths,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
        lock(&self.held).remove(&self.path);
    }
}

fn kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// The directory of `path` must resolve to itself: no symlink anywhere above the socket.
fn check_directory(path: &Path) -> Result<(), SocketRefusal> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let real = std::fs::canonicalize(dir)?;
    if real != dir {
        return Err(SocketRefusal::Symlink(real));
    }
    Ok(())
}

/// Binds a listening socket at `path` (text already admitted) with `mode`.
pub(crate) fn bind(
    path: &Path,
    mode: u32,
    held: &HeldPaths,
) -> Result<(tokio::net::UnixListener, SocketFile), SocketRefusal> {
    check_directory(path)?;
    if !lock(held).insert(path.to_path_buf()) {
        return Err(SocketRefusal::InUse);
    }
    // From here the path is ours in `held`; every early return gives it back.
    let release = |e: SocketRefusal| {
        lock(held).remove(path);
        e
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(release(SocketRefusal::InUse)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| release(e.into()))?;
            }
            Err(e) => return Err(release(e.into())),
        },
        Ok(m) => return Err(release(SocketRefusal::NotASocket(kind(&m)))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(release(e.into())),
    }
    let listen = || -> io::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        socket.bind(&socket2::SockAddr::unix(path)?)?;
        // Not listening yet: nobody can connect before the mode is set.
        let set = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::fs::symlink_metadata(path));
        let m = match set {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        Ok((socket.into(), (m.dev(), m.ino())))
    };
    let (std_listener, id) = listen().map_err(|e| release(e.into()))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        id,
        held: held.clone(),
    };
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(SocketRefusal::Io)?;
    Ok((listener, file))
}

/// Connects to the socket at `path` (text already admitted) if it resolves to itself: a
/// symlink at or above it could lead outside the permit list.
pub(crate) async fn connect(path: &Path) -> Result<tokio::net::UnixStream, SocketRefusal> {
    let real = std::fs::canonicalize(path)?;
    if real != path {
        return Err(SocketRefusal::Symlink(real));
    }
    Ok(tokio::net::UnixStream::connect(path).await?)
}
