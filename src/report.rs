//! Error reports: an error and its causes as one line. A leaf module, so
//! every layer (the KMS providers as much as the services) can use it.

/// An error and its sources by their `Display`, joined by ": ", for logs
/// and for wrapping a foreign error's story into a message. A cause whose
/// text is already included (SDK errors often repeat their source) is
/// skipped.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
