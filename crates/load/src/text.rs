//! The text every load message carries, so that a receiver knows, from the text alone,
//! which run and connection sent it, its place in that sender's schedule and when it was
//! meant to be sent:
//!
//! `L|<run_id>|<conn>|<counter>|<intended_unix_micros>|<padding>`
//!
//! `conn` counts from 0, `counter` is the index in the sender's fixed schedule (from 0),
//! and the padding (`x`s) brings the text to `--size` bytes. Texts of other runs, or that
//! do not parse, are not ours and are ignored.

use std::fmt::Write as _;

/// What a load message text says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub conn: u32,
    pub counter: u32,
    pub intended_unix_us: u64,
}

/// Builds the text of one message, padded with `x` to at least `size` bytes.
pub fn encode(run_id: &str, tag: Tag, size: usize) -> String {
    let mut s = String::with_capacity(size.max(48));
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "L|{run_id}|{}|{}|{}|",
        tag.conn, tag.counter, tag.intended_unix_us
    );
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Reads the tag of a text sent by the run `run_id`; `None` for anything else.
pub fn parse(text: &str, run_id: &str) -> Option<Tag> {
    let rest = text.strip_prefix("L|")?;
    let rest = rest.strip_prefix(run_id)?;
    let mut fields = rest.strip_prefix('|')?.splitn(4, '|');
    let conn = fields.next()?.parse().ok()?;
    let counter = fields.next()?.parse().ok()?;
    let intended_unix_us = fields.next()?.parse().ok()?;
    // The padding field must be there (the text ends with '|' at least).
    fields.next()?;
    Some(Tag {
        conn,
        counter,
        intended_unix_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let tag = Tag {
            conn: 12,
            counter: 7,
            intended_unix_us: 1_700_000_000_123_456,
        };
        let t = encode("abc123", tag, 0);
        assert_eq!(t, "L|abc123|12|7|1700000000123456|");
        assert_eq!(parse(&t, "abc123"), Some(tag));
        let padded = encode("abc123", tag, 100);
        assert_eq!(padded.len(), 100);
        assert_eq!(parse(&padded, "abc123"), Some(tag));
    }

    #[test]
    fn ignores_other_runs_and_noise() {
        let t = encode(
            "run1",
            Tag {
                conn: 1,
                counter: 2,
                intended_unix_us: 3,
            },
            0,
        );
        assert_eq!(parse(&t, "run2"), None);
        assert_eq!(parse(&t, "run"), None);
        assert_eq!(parse("hello", "run1"), None);
        assert_eq!(parse("L|run1|x|2|3|", "run1"), None);
        assert_eq!(parse("L|run1|1|2|3", "run1"), None);
    }
}
