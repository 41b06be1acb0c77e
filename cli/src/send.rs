//! `mllp-reactor send ADDR FILE…`: sends HL7 messages and prints one line per ACK.
//!
//! A file holds text messages (each starting at a line that begins with `MSH`; `\n` and `\r\n`
//! segment ends become `\r`), or an MLLP capture (frames `0x0B … 0x1C 0x0D`, sent as they are).
//! Every message is checked before anything is sent: each must start with an MSH segment with
//! a readable MSH-10, the id its ACK is matched by. Errors name the file and the message's
//! position in it, and every ACK received before an error is printed first.

use std::io::{IsTerminal, Read, Write};
use std::time::Instant;

use memchr::memmem;
use mllp_reactor::client::{Ack, Client, ClientConfig};
use mllp_reactor::codec::{CARRIAGE_RETURN, END_BLOCK, START_BLOCK};
use mllp_reactor::msh::Msh;

use crate::args::{SendArgs, TlsClientArgs};
use crate::error::{CliError, InputError, InputProblem};

/// TLS client settings from `--tls-ca`, `--tls-cert`, `--tls-key` and `--tls-server-name`
/// (shared by `send` and `bench`) for a server at `addr`; `None` without `--tls-ca`.
pub fn client_tls(
    flags: &TlsClientArgs,
    addr: &str,
) -> Result<Option<mllp_reactor::tls::ClientTls>, CliError> {
    crate::tls_client::client_tls(
        &crate::tls_client::TlsFiles {
            ca: flags.tls_ca.clone(),
            cert: flags.tls_cert.clone(),
            key: flags.tls_key.clone(),
            server_name: flags.tls_server_name.clone(),
        },
        addr,
    )
}

/// What standard input is called in messages.
const STDIN_NAME: &str = "<stdin>";

/// One message to send, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The file it was read from ([`STDIN_NAME`] for standard input).
    pub source: String,
    /// Its position in that file, from 1.
    pub position: usize,
    /// The payload, unframed.
    pub bytes: Vec<u8>,
}

impl Message {
    /// `FILE: message N`, for errors.
    fn place(&self) -> String {
        format!("{}: message {}", self.source, self.position)
    }

    /// An error about this message.
    fn error(&self, problem: InputProblem) -> InputError {
        InputError {
            source: self.source.clone(),
            position: Some(self.position),
            problem,
        }
    }
}

/// Splits text into messages: each starts at a line beginning with `MSH`; `\n` and `\r\n`
/// segment ends become `\r` (HL7's segment terminator); blank lines are dropped. Lines before
/// the first `MSH` form a message of their own, which [`check`] then refuses.
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

/// Splits an MLLP capture into payloads. Whitespace between frames is allowed (captures are
/// often saved one frame per line); anything else outside a frame is an error.
///
/// # Errors
///
/// The position of the message (from 1) and what is wrong with it.
pub fn split_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>, (usize, InputProblem)> {
    let mut payloads = Vec::new();
    let mut rest = bytes;
    loop {
        let skipped = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
        rest = &rest[skipped..];
        let position = payloads.len() + 1;
        match rest.first() {
            None => return Ok(payloads),
            Some(&START_BLOCK) => {}
            Some(&byte) => {
                let offset = bytes.len() - rest.len();
                return Err((position, InputProblem::OutsideFrame { byte, offset }));
            }
        }
        let Some(end) = memmem::find(&rest[1..], &[END_BLOCK, CARRIAGE_RETURN]) else {
            return Err((position, InputProblem::NoEnd));
        };
        payloads.push(rest[1..1 + end].to_vec());
        rest = &rest[1 + end + 2..];
    }
}

/// Reads the messages of one file (or standard input), framed or text.
///
/// # Errors
///
/// An [`InputError`] naming `source` and, where it applies, the message's position.
pub fn read_messages(source: &str, bytes: &[u8]) -> Result<Vec<Message>, InputError> {
    let error = |position, problem| InputError {
        source: source.to_owned(),
        position,
        problem,
    };
    let framed = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == START_BLOCK);
    let payloads = if framed {
        split_frames(bytes).map_err(|(n, problem)| error(Some(n), problem))?
    } else {
        split_messages(bytes)
    };
    if payloads.is_empty() {
        return Err(error(None, InputProblem::Empty));
    }
    let messages: Vec<Message> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| Message {
            source: source.to_owned(),
            position: i + 1,
            bytes,
        })
        .collect();
    for message in &messages {
        check(message)?;
    }
    Ok(messages)
}

/// Refuses a message whose ACK could not be matched to it.
fn check(message: &Message) -> Result<(), InputError> {
    let bytes = &message.bytes;
    let msh = Msh::parse(bytes).map_err(|reason| {
        let start: String = String::from_utf8_lossy(&bytes[..bytes.len().min(12)])
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        message.error(InputProblem::NoMsh {
            reason,
            start: start.trim_end().to_owned(),
        })
    })?;
    if msh.control_id().is_none() {
        return Err(message.error(InputProblem::NoControlId));
    }
    if memmem::find(bytes, &[END_BLOCK, CARRIAGE_RETURN]).is_some() {
        return Err(message.error(InputProblem::ContainsEndBlock));
    }
    Ok(())
}

/// Sends every message and prints one line per ACK.
///
/// # Errors
///
/// [`CliError::Nak`] when a message was not accepted (AA/CA), after printing every ACK;
/// otherwise which file or message, and what went wrong. ACKs received before the error have
/// been printed.
pub fn send(opts: &SendArgs) -> Result<(), CliError> {
    let mut messages = Vec::new();
    if opts.files.is_empty() || opts.files.iter().any(|f| f == "-") {
        let mut text = Vec::new();
        std::io::stdin()
            .read_to_end(&mut text)
            .map_err(|source| CliError::Read {
                what: "standard input".to_owned(),
                source,
            })?;
        messages.extend(read_messages(STDIN_NAME, &text).map_err(CliError::Input)?);
    }
    for file in opts.files.iter().filter(|f| *f != "-") {
        let bytes = std::fs::read(file).map_err(|source| CliError::Read {
            what: file.clone(),
            source,
        })?;
        messages.extend(read_messages(file, &bytes).map_err(CliError::Input)?);
    }
    let addrs = crate::addr::resolve_flag_all("", &opts.addr)?;
    let mut config = ClientConfig::default().response_timeout(opts.timeout);
    if let Some(tls) = client_tls(&opts.tls, &opts.addr)? {
        config = config.tls(tls);
    }
    let mut client =
        Client::connect(addrs.as_slice(), config).map_err(|source| CliError::Client {
            context: format!("cannot connect to {}", opts.addr),
            source,
        })?;
    let progress = messages.len() >= 100 && std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut all_accepted = true;
    let mut sent = 0;
    let mut out = std::io::stdout().lock();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.bytes.as_slice()).collect();
    let mut acks = Vec::new();
    for batch in payloads.chunks(opts.pipeline * 16) {
        acks.clear();
        let result = client.send_pipelined_into(batch, opts.pipeline, &mut acks);
        for ack in &acks {
            all_accepted &= ack.is_accept();
            print_ack(&mut out, ack);
        }
        if let Err(source) = result {
            // The ACKs come back in order, so the failed message is the first unanswered one.
            let _ = out.flush();
            return Err(CliError::Client {
                context: messages[sent + acks.len()].place(),
                source,
            });
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
    if all_accepted {
        Ok(())
    } else {
        Err(CliError::Nak)
    }
}

/// One line per ACK: code, MSA-2, and MSA-3 when present.
fn print_ack(out: &mut impl Write, ack: &Ack) {
    let text = ack
        .text
        .as_deref()
        .map(|t| format!(" {t}"))
        .unwrap_or_default();
    let _ = writeln!(out, "{} {}{}", ack.code.as_str(), ack.control_id, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5.1\r";
    const B: &[u8] = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|2|P|2.5.1\rPID|1\r";

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

    #[test]
    fn framed_captures_are_read_as_frames() {
        let capture = [&b"\x0b"[..], A, b"\x1c\r\n\x0b", B, b"\x1c\r\n"].concat();
        let m = read_messages("cap.mllp", &capture).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!((m[1].bytes.as_slice(), m[1].position), (B, 2));
        let cut = [&b"\x0b"[..], A, b"\x1c\r\x0b", B].concat();
        let e = read_messages("cap.mllp", &cut).unwrap_err().to_string();
        assert!(
            e.starts_with("cap.mllp: message 2: the frame has no end"),
            "{e}"
        );
        let junk = [&b"\x0b"[..], A, b"\x1c\rjunk"].concat();
        let e = read_messages("cap.mllp", &junk).unwrap_err().to_string();
        assert!(
            e.contains("message 2") && e.contains("outside any MLLP frame"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_message() {
        let text = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5.1\nMSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.5.1\n";
        let e = read_messages("batch.hl7", text).unwrap_err().to_string();
        assert!(e.starts_with("batch.hl7: message 2: MSH-10"), "{e}");
        let e = read_messages("pid.hl7", b"PID|1||123\nMSH|^~\\&|A\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pid.hl7: message 1: message does not start with an MSH segment"),
            "{e}"
        );
        assert!(e.contains("\"PID|1||123\""), "{e}");
        let e = read_messages("empty.hl7", b"\n\n").unwrap_err().to_string();
        assert!(e.starts_with("empty.hl7 holds no HL7 message"), "{e}");
    }
}
