//! A request path as a stranger sends it (`GET <path> HTTP/1.1`), mapped to
//! a file under the web root: whatever it is, an accepted result must be a
//! plain relative path that cannot climb out of the root.
#![no_main]

use std::path::{Component, Path};

use consolegate::front::web::{MAX_PATH, MAX_SEGMENTS, content_type, resolve_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rel) = resolve_path(path) else {
        return;
    };
    assert!(!rel.is_empty() && !rel.starts_with('/'), "{rel:?}");
    for seg in rel.split('/') {
        assert!(!seg.is_empty(), "empty segment in {rel:?}");
        assert!(!seg.starts_with('.'), "dot segment in {rel:?}");
        assert!(!seg.contains('\\'), "backslash in {rel:?}");
        assert!(!seg.chars().any(char::is_control), "control in {rel:?}");
    }
    assert!(
        Path::new(&rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{rel:?} has a non-normal component"
    );
    // Normalizing is idempotent: the result, re-encoded, maps to itself
    // (when re-encoding kept it within the limits).
    let again = format!("/{}", rel.replace('%', "%25"));
    if again.len() <= MAX_PATH && rel.split('/').count() <= MAX_SEGMENTS {
        assert_eq!(resolve_path(&again).as_deref(), Ok(rel.as_str()));
    }
    let _ = content_type(&rel);
});
