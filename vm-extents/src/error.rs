//! An error and its causes on one line, for the failures the manager's threads report as text.

/// `e` and its causes, joined with `": "`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out += &format!(": {cause}");
        source = cause.source();
    }
    out
}
