//! A program running in a pseudo-terminal, with a terminal emulator (vt100) reading what
//! it draws, so a test can type keys and look at the screen as a user would.

use std::{
    io::{Read, Write},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use portable_pty::{native_pty_system, Child, CommandBuilder, MasterPty, PtySize};

/// The screen and whether the program closed the terminal.
struct Shared {
    parser: vt100::Parser,
    closed: bool,
}

/// A program in a pseudo-terminal of a given size.
pub struct Tty {
    child: Box<dyn Child + Send + Sync>,
    master: Box<dyn MasterPty + Send>,
    writer: Box<dyn Write + Send>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl std::fmt::Debug for Tty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tty")
            .field("pid", &self.child.process_id())
            .finish_non_exhaustive()
    }
}

fn size(cols: u16, rows: u16) -> PtySize {
    PtySize {
        rows,
        cols,
        pixel_width: 0,
        pixel_height: 0,
    }
}

fn nonzero(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n.max(1)).unwrap_or(std::num::NonZeroU16::MIN)
}

impl Tty {
    /// Starts `program args...` in a `cols` x `rows` terminal (TERM=xterm-256color), with
    /// `env` set and the node settings of the environment cleared.
    pub fn spawn(
        program: &std::ffi::OsStr,
        args: &[std::ffi::OsString],
        env: &[(&str, &str)],
        cols: u16,
        rows: u16,
    ) -> Tty {
        let pair = native_pty_system()
            .openpty(size(cols, rows))
            .expect("open a pseudo-terminal");
        let mut cmd = CommandBuilder::new(program);
        cmd.args(args);
        for var in crate::NODE_ENV {
            cmd.env_remove(var);
        }
        cmd.env_remove("NO_COLOR");
        cmd.env("P2P_NO_MDNS", "1");
        cmd.env("TERM", "xterm-256color");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = pair
            .slave
            .spawn_command(cmd)
            .expect("spawn in the terminal");
        // The program holds the terminal now; without our copy, its exit ends the output.
        drop(pair.slave);
        let master = pair.master;
        let mut reader = master.try_clone_reader().expect("terminal reader");
        let writer = master.take_writer().expect("terminal writer");
        let shared = Arc::new((
            Mutex::new(Shared {
                parser: vt100::Parser::new(nonzero(rows), nonzero(cols), 0),
                closed: false,
            }),
            Condvar::new(),
        ));
        let sink = shared.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*sink;
                let Ok(mut s) = lock.lock() else { return };
                if n == 0 {
                    s.closed = true;
                    cv.notify_all();
                    return;
                }
                s.parser.process(&buf[..n]);
                cv.notify_all();
            }
        });
        Tty {
            child,
            master,
            writer,
            shared,
        }
    }

    /// The program's process id.
    pub fn pid(&self) -> u32 {
        self.child.process_id().expect("a process id")
    }

    /// Types `keys` (raw bytes: `\r` is Enter, `\t` Tab, `\x1b[A` Up, `\x03` Ctrl+C ...).
    pub fn send(&mut self, keys: &str) {
        self.writer
            .write_all(keys.as_bytes())
            .expect("write to the terminal");
        self.writer.flush().expect("flush the terminal");
    }

    /// Changes the terminal's size, as a user resizing the window does.
    pub fn resize(&mut self, cols: u16, rows: u16) {
        let (lock, _) = &*self.shared;
        if let Ok(mut s) = lock.lock() {
            s.parser.screen_mut().set_size(nonzero(rows), nonzero(cols));
        }
        self.master.resize(size(cols, rows)).expect("resize");
    }

    /// Runs `f` on the screen as it is now.
    pub fn with_screen<R>(&self, f: impl FnOnce(&vt100::Screen) -> R) -> R {
        let (lock, _) = &*self.shared;
        let s = lock.lock().expect("screen lock");
        f(s.parser.screen())
    }

    /// The screen's rows as text (trailing blanks removed).
    pub fn rows(&self) -> Vec<String> {
        self.with_screen(rows_of)
    }

    /// Waits up to `deadline` until `pred` holds for the screen; panics with the screen
    /// when it does not.
    pub fn wait_for(
        &self,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&vt100::Screen) -> bool,
    ) -> Vec<String> {
        let end = Instant::now() + deadline;
        let (lock, cv) = &*self.shared;
        let mut s = lock.lock().expect("screen lock");
        loop {
            if pred(s.parser.screen()) {
                return rows_of(s.parser.screen());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || s.closed {
                let rows = rows_of(s.parser.screen()).join("\n");
                panic!("{what}: not seen within {deadline:?}; the screen:\n{rows}");
            }
            s = cv.wait_timeout(s, left).expect("screen lock").0;
        }
    }

    /// Waits up to `deadline` for the program to exit.
    pub fn wait_exit(&mut self, deadline: Duration) -> portable_pty::ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "the program did not exit within {deadline:?}; the screen:\n{}",
                    self.rows().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The rows of `screen` as text, trailing blanks removed.
pub fn rows_of(screen: &vt100::Screen) -> Vec<String> {
    let (_, cols) = screen.size();
    screen
        .rows(0, cols.get())
        .map(|r| r.trim_end().to_string())
        .collect()
}
