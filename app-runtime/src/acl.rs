//! Access control per target app: Dapr's `Configuration.spec.accessControl`
//! (<https://docs.dapr.io/operations/configuration/invoke-allowlist/>).
//!
//! The caller's policy is the one whose `appId` (and `namespace`, when
//! given) is the caller's; within it the most specific matching operation
//! decides (an exact path before `*`, one segment, before `**`, any
//! depth), else the policy's `defaultAction`; a caller without a policy, or
//! without an app id at all, gets the global `defaultAction`.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessControl {
    #[serde(default)]
    pub default_action: Action,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub policies: Vec<AppPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppPolicy {
    pub app_id: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Absent: the global default applies to what no operation matches.
    #[serde(default)]
    pub default_action: Option<Action>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub operations: Vec<Operation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub name: String,
    #[serde(default)]
    pub http_verb: Vec<String>,
    pub action: Action,
}

/// Who is calling, as far as access control cares.
#[derive(Debug, Clone, Copy)]
pub struct CallerId<'a> {
    pub app_id: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

impl AccessControl {
    /// The decision for `caller` calling `method` (the path after
    /// `/method/`) with HTTP `verb`.
    pub fn decide(&self, caller: CallerId<'_>, verb: &str, method: &str) -> Action {
        let Some(app) = caller.app_id else {
            return self.default_action;
        };
        let policy = self.policies.iter().find(|p| {
            p.app_id == app
                && p.namespace
                    .as_deref()
                    .is_none_or(|ns| Some(ns) == caller.namespace)
        });
        let Some(policy) = policy else {
            return self.default_action;
        };
        let path = normalize(method);
        let best = policy
            .operations
            .iter()
            .filter(|op| verb_matches(&op.http_verb, verb))
            .filter_map(|op| specificity(&normalize(&op.name), &path).map(|s| (s, op)))
            .max_by_key(|(s, _)| *s);
        match best {
            Some((_, op)) => op.action,
            None => policy.default_action.unwrap_or(self.default_action),
        }
    }
}

fn verb_matches(verbs: &[String], verb: &str) -> bool {
    verbs.is_empty()
        || verbs
            .iter()
            .any(|v| v == "*" || v.eq_ignore_ascii_case(verb))
}

/// `/a/b` for `a/b`, `/a/b/`, `//a//b`.
fn normalize(p: &str) -> String {
    let segs: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    format!("/{}", segs.join("/"))
}

/// How specifically `pattern` matches `path` (None: no match). Higher is
/// more specific: literal segments count most, `*` less, `**` least.
fn specificity(pattern: &str, path: &str) -> Option<(u32, u32)> {
    let pat: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    fn go(pat: &[&str], segs: &[&str]) -> Option<(u32, u32)> {
        match (pat.first(), segs.first()) {
            (None, None) => Some((0, 2)),
            (Some(&"**"), _) => {
                // `**` takes zero or more segments; prefer taking fewer.
                (0..=segs.len())
                    .filter_map(|k| go(&pat[1..], &segs[k..]))
                    .max()
                    .map(|(lit, _)| (lit, 0))
            }
            (Some(&"*"), Some(_)) => go(&pat[1..], &segs[1..]).map(|(lit, w)| (lit, w.min(1))),
            (Some(p), Some(s)) if p == s => go(&pat[1..], &segs[1..]).map(|(lit, w)| (lit + 1, w)),
            _ => None,
        }
    }
    go(&pat, &segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> AccessControl {
        serde_json::from_value(serde_json::json!({
            "defaultAction": "deny",
            "trustDomain": "public",
            "policies": [
                {"appId": "front", "defaultAction": "deny", "namespace": "default", "operations": [
                    {"name": "/orders", "httpVerb": ["GET"], "action": "allow"},
                    {"name": "/orders/*", "httpVerb": ["POST", "PUT"], "action": "allow"},
                    {"name": "/admin/**", "httpVerb": ["*"], "action": "deny"},
                    {"name": "/admin/public", "httpVerb": ["*"], "action": "allow"}
                ]},
                {"appId": "ops", "defaultAction": "allow"}
            ]
        }))
        .expect("acl")
    }

    fn who<'a>(app: Option<&'a str>, ns: &'a str) -> CallerId<'a> {
        CallerId {
            app_id: app,
            namespace: Some(ns),
        }
    }

    #[test]
    fn dapr_allowlist_semantics() {
        let a = acl();
        let front = who(Some("front"), "default");
        assert_eq!(a.decide(front, "GET", "orders"), Action::Allow);
        assert_eq!(
            a.decide(front, "POST", "orders"),
            Action::Deny,
            "verb not listed"
        );
        assert_eq!(a.decide(front, "POST", "/orders/17"), Action::Allow);
        assert_eq!(
            a.decide(front, "POST", "/orders/17/items"),
            Action::Deny,
            "* is one segment"
        );
        assert_eq!(a.decide(front, "GET", "/admin/x/y"), Action::Deny);
        assert_eq!(
            a.decide(front, "GET", "/admin/public"),
            Action::Allow,
            "exact beats **"
        );
        assert_eq!(
            a.decide(front, "GET", "/other"),
            Action::Deny,
            "policy default"
        );
        // The policy is for namespace default only.
        assert_eq!(
            a.decide(who(Some("front"), "prod"), "GET", "orders"),
            Action::Deny
        );
        assert_eq!(
            a.decide(who(Some("ops"), "x"), "DELETE", "/anything"),
            Action::Allow
        );
        assert_eq!(
            a.decide(who(Some("stranger"), "default"), "GET", "orders"),
            Action::Deny
        );
        assert_eq!(
            a.decide(who(None, "default"), "GET", "orders"),
            Action::Deny
        );
    }

    #[test]
    fn no_access_control_allows() {
        let a = AccessControl::default();
        assert_eq!(a.decide(who(None, "d"), "GET", "/x"), Action::Allow);
    }
}
