//! The normalization table: classic policy bypasses and what each becomes.

use super::{MAX_TARGET_LEN, PathError, normalize_path};

/// `raw` normalizes to `path` (and keeps `query`).
fn normal(raw: &str) -> (String, Option<String>) {
    let n = normalize_path(raw).unwrap_or_else(|e| panic!("{raw:?} was refused: {e}"));
    (n.path().to_owned(), n.query().map(str::to_owned))
}

#[test]
fn equivalent_spellings_of_a_path_become_one() {
    let table: &[(&str, &str)] = &[
        ("/admin", "/admin"),
        ("/", "/"),
        // Repeated slashes.
        ("//admin", "/admin"),
        ("/a//b///c", "/a/b/c"),
        // Dot segments, never above the root.
        ("/./admin", "/admin"),
        ("/public/../admin", "/admin"),
        ("/../admin", "/admin"),
        ("/../../../admin", "/admin"),
        ("/a/b/../../admin", "/admin"),
        ("/a/./b/.", "/a/b/"),
        ("/a/..", "/"),
        // Encoded unreserved characters, dots included (then resolved).
        ("/%61dmin", "/admin"),
        ("/%41DMIN", "/ADMIN"),
        ("/%2e%2e/admin", "/admin"),
        ("/public/%2E%2E/admin", "/admin"),
        ("/%7euser", "/~user"),
        // Other escapes stay encoded, upper-cased; never decoded twice.
        ("/a%2ab", "/a%2Ab"),
        ("/%2561dmin", "/%2561dmin"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%3Fb", "/a%3Fb"),
    ];
    let mut failures = Vec::new();
    for (raw, want) in table {
        let (got, _) = normal(raw);
        if got != *want {
            failures.push(format!("{raw:?}: expected {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn what_the_waypoint_does_not_fold() {
    // Case is significant in paths.
    assert_eq!(normal("/ADMIN").0, "/ADMIN");
    // A trailing slash is another path (as for Istio's exact paths); `/admin*` covers both.
    assert_eq!(normal("/admin/").0, "/admin/");
    assert_eq!(normal("/admin").0, "/admin");
}

#[test]
fn the_query_is_kept_apart_and_untouched() {
    assert_eq!(
        normal("//a/../b?x=%2F&y=/../z"),
        ("/b".into(), Some("x=%2F&y=/../z".into()))
    );
    assert_eq!(normal("/a?").1, Some(String::new()));
    assert_eq!(normal("/a").1, None);
    let n = normalize_path("/a/./b?q=1").expect("valid target");
    assert_eq!(n.path_and_query(), "/a/b?q=1");
    assert_eq!(n.to_string(), "/a/b?q=1");
}

#[test]
fn targets_that_could_smuggle_a_separator_are_refused() {
    let table: &[(&str, PathError)] = &[
        ("/admin%2f", PathError::EncodedSeparator),
        ("/admin%2Fsecret", PathError::EncodedSeparator),
        ("/public%2F..%2Fadmin", PathError::EncodedSeparator),
        ("/a%5cb", PathError::EncodedSeparator),
        ("/a\\b", PathError::BadCharacter('\\')),
        ("/a%00b", PathError::Control),
        ("/a%0ab", PathError::Control),
        ("/a%7Fb", PathError::Control),
        ("/a\u{1}b", PathError::Control),
        ("/a#frag", PathError::BadCharacter('#')),
        ("/a b", PathError::BadCharacter(' ')),
        (
            "/caf\u{e9}",
            PathError::BadCharacter(char::REPLACEMENT_CHARACTER),
        ),
        ("/a%", PathError::BadEscape),
        ("/a%4", PathError::BadEscape),
        ("/a%G1", PathError::BadEscape),
        ("/a%%41", PathError::BadEscape),
        // Overlong `/` and `.`, a lone continuation byte, a truncated sequence.
        ("/%c0%af", PathError::InvalidUtf8),
        ("/%e0%80%af", PathError::InvalidUtf8),
        ("/%c0%ae%c0%ae/admin", PathError::InvalidUtf8),
        ("/%80", PathError::InvalidUtf8),
        ("/%c3", PathError::InvalidUtf8),
        ("/%c3/x", PathError::InvalidUtf8),
        ("admin", PathError::NotOriginForm),
        ("", PathError::NotOriginForm),
        ("?q", PathError::NotOriginForm),
        ("*", PathError::NotOriginForm),
        ("http://h/admin", PathError::NotOriginForm),
        // Path parameters, in any segment, raw or encoded: servlet containers strip them
        // (`/;/admin` is `/admin` there, `..;x` is `..`), other backends do not.
        ("/public/..;/admin", PathError::PathParameters),
        ("/public/..;jsessionid=1/admin", PathError::PathParameters),
        ("/.;x/admin", PathError::PathParameters),
        ("/%2e%2e;/admin", PathError::PathParameters),
        ("/;/admin", PathError::PathParameters),
        ("/;x/admin", PathError::PathParameters),
        ("/%3B/admin", PathError::PathParameters),
        ("/%3bx/admin", PathError::PathParameters),
        ("/admin;x", PathError::PathParameters),
        ("/admin;jsessionid=1/../x", PathError::PathParameters),
    ];
    let mut failures = Vec::new();
    for (raw, want) in table {
        let got = normalize_path(raw);
        if got.as_ref().err() != Some(want) {
            failures.push(format!("{raw:?}: expected {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn very_long_targets_are_refused_before_any_work() {
    let at_limit = format!("/{}", "a".repeat(MAX_TARGET_LEN - 1));
    assert_eq!(normal(&at_limit).0.len(), MAX_TARGET_LEN);
    let over = format!("/{}", "a".repeat(MAX_TARGET_LEN));
    assert_eq!(normalize_path(&over), Err(PathError::TooLong));
    // Many dot segments within the limit resolve to the root, linearly.
    let dots = "/..".repeat(MAX_TARGET_LEN / 3);
    assert_eq!(normal(&dots).0, "/");
}

#[test]
fn normalizing_twice_changes_nothing() {
    for raw in [
        "//a/./b/../c%2a%41?q",
        "/%c3%a9t%C3%A9/",
        "/a:b/../c@",
        "/~x/.y/..z",
    ] {
        let once = normalize_path(raw).expect("valid target");
        let twice = normalize_path(&once.path_and_query()).expect("normal form is valid");
        assert_eq!(once, twice, "{raw:?}");
    }
}

mod properties;
