//! The control socket: a running node (the chat, `listen`, `daemon`) answers the other
//! commands on the same data directory, so `send` and `history` work beside an open chat.
//!
//! A Unix socket, `control.sock` in the data directory (itself 0700), mode 0600, and every
//! caller's uid checked against the node's (`SO_PEERCRED`): nothing on the network, and
//! no other user. One request per connection: a JSON line in, a JSON line out. The
//! answer is what the command prints ([`Output`]), so a command prints the same whether
//! it ran the node itself or asked the running one.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;

/// The socket's file name in the data directory.
pub const SOCKET: &str = "control.sock";

/// Longest request or answer line.
const MAX_LINE: u64 = 4 << 20;

/// How long a caller may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a command waits for the running node's answer (a send may dial and deposit).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Requests a command makes of the running node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `p2p-node status`.
    Status,
    /// `p2p-node send TO TEXT`.
    Send {
        /// Name or NodeId.
        to: String,
        /// The text.
        text: String,
    },
    /// `p2p-node history PEER`.
    History {
        /// Name or NodeId.
        peer: String,
        /// How many messages.
        limit: usize,
    },
    /// `p2p-node peers`.
    Peers,
    /// `p2p-node register NAME`.
    Register {
        /// The name.
        name: String,
    },
    /// `p2p-node stop`: log out and exit.
    Stop,
}

/// What a command prints: JSON objects (with `--json`) or text lines on stdout, and
/// notes on stderr either way.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Output {
    /// One JSON object per line, with `--json`.
    pub json: Vec<Value>,
    /// Lines for people, without `--json`.
    pub text: Vec<String>,
    /// Lines for stderr (warnings, what was left behind).
    pub notes: Vec<String>,
}

impl Output {
    /// Prints it.
    pub fn print(&self, json: bool) {
        for note in &self.notes {
            eprintln!("p2p-node: {note}");
        }
        if json {
            for v in &self.json {
                println!("{v}");
            }
        } else {
            for line in &self.text {
                println!("{line}");
            }
        }
    }
}

/// The running node's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(Output),
    Error(String),
}

/// Which process serves the socket, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The interactive chat.
    Chat,
    /// `p2p-node listen`.
    Listen,
    /// `p2p-node daemon`.
    Daemon,
}

impl Kind {
    /// `"chat"`, `"listen"`, `"daemon"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Listen => "listen",
            Kind::Daemon => "daemon",
        }
    }
}

/// The socket's path for a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// The control socket being served; removed when dropped.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the control socket of `data_dir` with `handle`, until the returned [`Server`]
/// is dropped.
///
/// The caller holds the data directory's lock, so a socket file already there is a
/// stale one (a node that did not exit cleanly) and is replaced.
pub fn serve<H, F>(data_dir: &Path, handle: H) -> Result<Server>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Output>> + Send + 'static,
{
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot serve the control socket {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    let done = CancellationToken::new();
    let handle = std::sync::Arc::new(handle);
    let until = done.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = until.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: cannot accept");
                        // EMFILE and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &*handle).await {
                    tracing::debug!(error = %e, "control socket: request failed");
                }
            });
        }
    });
    Ok(Server { path, stop: done })
}

/// Whether the caller on `stream` is this process's user.
fn same_user(stream: &UnixStream) -> io::Result<bool> {
    let cred = stream.peer_cred()?;
    Ok(cred.uid() == nix::unistd::geteuid().as_raw())
}

/// Reads one request and writes its answer.
async fn answer<H, F>(stream: UnixStream, handle: &H) -> Result<()>
where
    H: Fn(Request) -> F,
    F: std::future::Future<Output = Result<Output>>,
{
    let allowed = same_user(&stream)?;
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_LINE);
    tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .context("no request in time")??;
    let answer = if !allowed {
        Answer::Error("the control socket answers only the user running the node".into())
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(request) => match handle(request).await {
                Ok(output) => Answer::Ok(output),
                Err(e) => Answer::Error(crate::output::one_line(&e)),
            },
            Err(e) => Answer::Error(format!("not a request: {e}")),
        }
    };
    let mut bytes = serde_json::to_vec(&answer)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await?;
    Ok(())
}

/// Asks the node running on `data_dir`, if one serves the socket; `None` when none
/// runs (no socket, or a stale one nobody listens on).
pub async fn ask(data_dir: &Path, request: &Request) -> Result<Option<Output>> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot reach the running node at {}", path.display()))
        }
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        // A node that refuses may close before reading: its answer says why.
        let _ = write.write_all(&bytes).await;
        let mut line = String::new();
        BufReader::new(read)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await?;
        anyhow::Ok(line)
    };
    let line = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .context("the running node did not answer in time")??;
    if line.is_empty() {
        anyhow::bail!("the running node closed its control socket without an answer");
    }
    match serde_json::from_str::<Answer>(&line)
        .context("the running node gave an answer this version does not read")?
    {
        Answer::Ok(output) => Ok(Some(output)),
        Answer::Error(e) => Err(anyhow!(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_gets_its_answer_and_garbage_a_clear_refusal() {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = serve(dir.path(), |request| async move {
            match request {
                Request::Send { to, text } => Ok(Output {
                    text: vec![format!("{to}: {text}")],
                    ..Output::default()
                }),
                _ => Err(anyhow!("not here")),
            }
        })
        .expect("serves");
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(socket_path(dir.path()))
                .expect("socket")
                .permissions()
                .mode()
        };
        assert_eq!(mode & 0o777, 0o600);
        let send = Request::Send {
            to: "bob".into(),
            text: "hi".into(),
        };
        let out = ask(dir.path(), &send)
            .await
            .expect("asks")
            .expect("answered");
        assert_eq!(out.text, vec!["bob: hi".to_owned()]);
        let err = ask(dir.path(), &Request::Peers).await.expect_err("refused");
        assert_eq!(err.to_string(), "not here");

        // Not JSON: refused with a reason, and the server goes on.
        let mut raw = UnixStream::connect(socket_path(dir.path()))
            .await
            .expect("connects");
        raw.write_all(b"\xff\xfe garbage\n").await.expect("writes");
        let mut back = String::new();
        BufReader::new(&mut raw)
            .read_line(&mut back)
            .await
            .expect("reads");
        assert!(back.contains("error"), "{back}");
        assert!(ask(dir.path(), &send).await.expect("asks").is_some());

        // Dropping the server removes the socket: nobody runs.
        drop(server);
        assert!(ask(dir.path(), &send).await.expect("no error").is_none());
    }
}
