//! Property tests: whatever the input, normalization either refuses it or yields the one
//! normal form policies are written against, and spellings a backend reads as one path
//! normalize to one string.

use proptest::{
    prelude::*,
    sample::{Index, select},
    test_runner::TestCaseError,
};

use crate::policy::normalize::{MAX_TARGET_LEN, NormalizedPath, PathError, normalize_path};

/// Pieces of hostile targets: separators, dots, escapes of every kind, parameters.
fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/", "//", ".", "..", "a", "B", "admin", "%61", "%2e", "%2E", "%2F", "%2f", "%5C", ";",
        ";x=1", "%3B", "%3b", "%41", "~", "%7e", "-", "%25", "%2a", "?", "q=%2F", "%c3%a9",
        "%C0%AF", "#", "%00", ":", "@", "!", "%20", "\\",
    ])
}

fn target() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
}

/// Anything a client can put in a target: the hostile pieces above, any character at all, or
/// an escape of any byte in either hex case.
fn anything() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => piece().prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
        1 => any::<u8>().prop_map(|b| format!("%{b:02x}")),
        1 => any::<u8>().prop_map(|b| format!("%{b:02X}")),
    ]
}

fn hostile_target() -> impl Strategy<Value = String> {
    prop::collection::vec(anything(), 0..24).prop_map(|pieces| format!("/{}", pieces.concat()))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// What every accepted target normalizes to: a path starting with `/`, of printable ASCII,
/// without empty, `.` or `..` segments, without parameters, raw or encoded separators, and
/// with every escape upper-case and needed (never an unreserved character, a separator or a
/// control character); the query exactly as received; and normalizing it again changes
/// nothing.
fn check_normal_form(raw: &str, n: &NormalizedPath) -> Result<(), TestCaseError> {
    let path = n.path();
    prop_assert!(raw.len() <= MAX_TARGET_LEN);
    prop_assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    prop_assert!(
        path.bytes().all(|b| b.is_ascii_graphic()),
        "{raw:?} -> {path:?}"
    );
    prop_assert!(!path.contains([';', '\\', '#', '?']), "{raw:?} -> {path:?}");
    prop_assert!(!path.contains("//"), "{raw:?} -> {path:?}");
    let segments: Vec<&str> = path.split('/').collect();
    prop_assert!(
        !segments.contains(&".") && !segments.contains(&".."),
        "{raw:?} -> {path:?}"
    );
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
        prop_assert!(
            hex.len() == 2
                && hex
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
            "{raw:?} -> {path:?}: escape at {i} is not two upper-case hex digits"
        );
        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or_default(), 16)
            .unwrap_or_default();
        prop_assert!(
            !is_unreserved(v) && !matches!(v, b'/' | b'\\' | b';') && !v.is_ascii_control(),
            "{raw:?} -> {path:?}: escape %{v:02X} should have been decoded or refused"
        );
    }
    prop_assert_eq!(n.query(), raw.split_once('?').map(|(_, q)| q), "{:?}", raw);
    let again = normalize_path(&n.path_and_query());
    prop_assert_eq!(again.as_ref(), Ok(n), "{:?} is not a fixed point", raw);
    Ok(())
}

/// A path a backend reads unambiguously: segments of unreserved and safe characters.
fn plain_segments() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[a-zA-Z0-9_~:@!-]{1,6}", 0..6)
}

/// One way of spelling a segment that every backend decodes to the segment itself.
fn respell(segment: &str, how: u8) -> String {
    match how % 4 {
        // Percent-encode every unreserved character, with either hex case.
        0 => segment
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    if how & 0x10 == 0 {
                        format!("%{b:02X}")
                    } else {
                        format!("%{b:02x}")
                    }
                } else {
                    char::from(b).to_string()
                }
            })
            .collect(),
        // A detour through a sibling and back.
        1 => format!("x/../{segment}"),
        // A `.` segment before it.
        2 => format!("./{segment}"),
        // An extra slash before it.
        _ => format!("/{segment}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_normal_form_is_a_fixed_point_without_parameters_dots_or_empty_segments(
        raw in prop_oneof![target(), hostile_target()],
    ) {
        if let Ok(n) = normalize_path(&raw) {
            check_normal_form(&raw, &n)?;
        }
    }

    #[test]
    fn arbitrary_bytes_are_normalized_or_refused_never_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
        leading_slash in any::<bool>(),
    ) {
        let text = String::from_utf8_lossy(&bytes);
        let raw = if leading_slash { format!("/{text}") } else { text.into_owned() };
        match normalize_path(&raw) {
            Ok(n) => check_normal_form(&raw, &n)?,
            Err(PathError::NotOriginForm) => prop_assert!(!raw.starts_with('/')),
            Err(_) => {}
        }
    }

    #[test]
    fn an_encoded_separator_in_any_segment_is_refused_but_not_in_the_query(
        segments in prop::collection::vec("[a-z.]{1,4}", 1..5),
        at in any::<Index>(),
        offset in any::<Index>(),
        separator in select(vec!["%2F", "%2f", "%5C", "%5c"]),
    ) {
        let i = at.index(segments.len());
        let raw: String = segments
            .iter()
            .enumerate()
            .map(|(j, s)| {
                if j == i {
                    let k = offset.index(s.len() + 1);
                    format!("/{}{separator}{}", &s[..k], &s[k..])
                } else {
                    format!("/{s}")
                }
            })
            .collect();
        prop_assert_eq!(normalize_path(&raw), Err(PathError::EncodedSeparator), "{}", raw);
        // The query is kept as received, never decoded: an escape there separates nothing.
        let in_query = format!("/{}?next={separator}admin", segments.join("/"));
        let n = normalize_path(&in_query);
        prop_assert!(n.is_ok(), "{:?}: {:?}", in_query, n);
    }

    #[test]
    fn spellings_a_backend_reads_as_one_path_normalize_to_one_string(
        segments in plain_segments(),
        hows in prop::collection::vec(any::<u8>(), 6),
        trailing in any::<bool>(),
    ) {
        let plain = format!("/{}{}", segments.join("/"), if trailing && !segments.is_empty() { "/" } else { "" });
        let respelled = format!(
            "/{}{}",
            segments.iter().zip(&hows).map(|(s, h)| respell(s, *h)).collect::<Vec<_>>().join("/"),
            if trailing && !segments.is_empty() { "/" } else { "" },
        );
        let a = normalize_path(&plain).map(|n| n.path().to_owned());
        let b = normalize_path(&respelled).map(|n| n.path().to_owned());
        prop_assert_eq!(&a, &b, "{} and {} differ", plain, respelled);
        prop_assert_eq!(a, Ok(plain.replace("//", "/")));
    }

    #[test]
    fn a_parameter_in_any_segment_is_refused(
        segments in prop::collection::vec("[a-z]{1,4}", 1..5),
        at in any::<prop::sample::Index>(),
        param in prop::sample::select(vec![";", ";x", ";jsessionid=1", "%3B", "%3bx"]),
    ) {
        let i = at.index(segments.len());
        let raw: String = segments
            .iter()
            .enumerate()
            .map(|(j, s)| if j == i { format!("/{s}{param}") } else { format!("/{s}") })
            .collect();
        prop_assert_eq!(normalize_path(&raw), Err(PathError::PathParameters));
        let leading = format!("/{param}{raw}");
        prop_assert_eq!(normalize_path(&leading), Err(PathError::PathParameters));
    }
}
