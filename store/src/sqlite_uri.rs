//! SQLite URI filenames (`file:PATH?QUERY`), for the opens that need a query parameter:
//! `immutable=1` for a store no writer has open, `mode=ro` for a read-only attach.

use std::path::Path;

/// An SQLite URI for `path` with `query` (`immutable=1`, `mode=ro`); `None` for a path that
/// is not UTF-8. The connection must allow URIs (`SQLITE_OPEN_URI`).
pub(crate) fn uri(path: &Path, query: &str) -> Option<String> {
    let text = path.to_str()?;
    let mut uri = String::from("file:");
    for c in text.chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push('?');
    uri.push_str(query);
    Some(uri)
}
