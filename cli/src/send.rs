//! `mllp-reactor send ADDR FILE…`: sends HL7 messages and prints one line per ACK.

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use mllp_reactor::client::{Client, ClientConfig};

/// Options of `send`, already parsed.
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub addr: String,
    pub files: Vec<String>,
    pub pipeline: usize,
    pub timeout: Duration,
}

/// Splits file contents into messages: each starts at a line beginning with `MSH`; `\n` and
/// `\r\n` segment ends become `\r` (HL7's segment terminator); blank lines are dropped.
pub fn split_messages(text: &[u8]) -> Vec<Vec<u8>> {
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for line in text.split(|b| *b == b'\n' || *b == b'\r') {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if line.starts_with(b"MSH") || messages.is_empty() {
            messages.push(Vec::new());
        }
        let current = messages.last_mut().expect("pushed above");
        current.extend_from_slice(line);
        current.push(b'\r');
    }
    messages
}

/// Sends every message; returns Ok(true) if all were accepted (AA/CA).
pub fn send(opts: &SendOptions) -> Result<bool, String> {
    let mut messages = Vec::new();
    if opts.files.is_empty() || opts.files.iter().any(|f| f == "-") {
        let mut text = Vec::new();
        std::io::stdin()
            .read_to_end(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        messages.extend(split_messages(&text));
    }
    for file in opts.files.iter().filter(|f| *f != "-") {
        let text = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        let found = split_messages(&text);
        if found.is_empty() {
            return Err(format!(
                "{file} holds no HL7 message (expected lines starting with MSH)"
            ));
        }
        messages.extend(found);
    }
    if messages.is_empty() {
        return Err(
            "no message to send: give files, or pipe messages on standard input".to_owned(),
        );
    }
    let config = ClientConfig::default().response_timeout(opts.timeout);
    let mut client = Client::connect(opts.addr.as_str(), config).map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is a server listening there?)",
            opts.addr
        )
    })?;
    let progress = messages.len() >= 100 && std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut all_accepted = true;
    let mut sent = 0;
    let mut out = std::io::stdout().lock();
    for batch in messages.chunks(opts.pipeline.max(1) * 16) {
        let acks = client
            .send_pipelined(batch, opts.pipeline.max(1))
            .map_err(|e| format!("message {}: {e}", sent + 1))?;
        for ack in acks {
            all_accepted &= ack.is_accept();
            let text = ack
                .text
                .as_deref()
                .map(|t| format!(" {t}"))
                .unwrap_or_default();
            let _ = writeln!(out, "{} {}{}", ack.code.as_str(), ack.control_id, text);
        }
        sent += batch.len();
        if progress {
            let rate = sent as f64 / started.elapsed().as_secs_f64();
            eprint!("\r{sent}/{} sent, {rate:.0} msg/s", messages.len());
        }
    }
    if progress {
        eprintln!();
    }
    Ok(all_accepted)
}

#[cfg(test)]
mod tests {
    use super::split_messages;

    #[test]
    fn splits_messages_and_normalises_segment_ends() {
        let text = b"MSH|^~\\&|A|1\r\nPID|1\n\nMSH|^~\\&|B|2\rPID|2\r";
        let m = split_messages(text);
        assert_eq!(
            m,
            vec![
                b"MSH|^~\\&|A|1\rPID|1\r".to_vec(),
                b"MSH|^~\\&|B|2\rPID|2\r".to_vec()
            ]
        );
    }
}
