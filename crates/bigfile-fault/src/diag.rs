//! Diagnostics from inside the signal handler: formatted into a stack buffer
//! (no allocation) and written to fd 2 with write(2).

use std::fmt::{self, Write};

use crate::sys;

/// A stack buffer that flushes to stderr whenever it fills, so a message of
/// any length goes out in as few write(2) calls as possible.
struct StderrBuf {
    buf: [u8; 512],
    len: usize,
}

impl StderrBuf {
    fn flush(&mut self) {
        sys::write_stderr(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for StderrBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            if self.len == self.buf.len() {
                self.flush();
            }
            let n = bytes.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

/// Prints `bigfile: <args>\n` to stderr, async-signal-safely.
pub(crate) fn report(args: fmt::Arguments<'_>) {
    let mut out = StderrBuf {
        buf: [0; 512],
        len: 0,
    };
    // Writing into StderrBuf never fails; a Display impl that fails just cuts the message.
    let _ = out.write_fmt(format_args!("bigfile: {args}\n"));
    out.flush();
}
