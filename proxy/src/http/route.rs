//! Route selection: the virtual host by authority, then the first route
//! whose precompiled matcher accepts the request.

use http::request::Parts;

use crate::config::{
    HeaderMatch, PathMatch, QueryMatch, Route, RouteMatch, RouteTable, StringMatch, VirtualHost,
};

impl RouteTable {
    /// The virtual host and route for a request, if any.
    pub fn route(&self, authority: &str, request: &Parts) -> Option<(&VirtualHost, &Route)> {
        let vhost = self.virtual_host(authority)?;
        let route = vhost.routes.iter().find(|r| r.matcher.matches(request))?;
        Some((vhost, route))
    }
}

impl RouteMatch {
    /// True when every condition holds.
    pub fn matches(&self, request: &Parts) -> bool {
        let path = request.uri.path();
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => whole(r, path),
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(request))
            && self.query.iter().all(|q| q.matches(request.uri.query()))
    }
}

impl HeaderMatch {
    fn matches(&self, request: &Parts) -> bool {
        let found = if self.is_method {
            Some(request.method.as_str())
        } else {
            // Several values of one header are matched joined by ",", as
            // Envoy does.
            let mut values = request.headers.get_all(&self.name).iter();
            match (values.next(), values.next()) {
                (None, _) => None,
                (Some(v), None) => v.to_str().ok(),
                (Some(_), Some(_)) => {
                    return self.matches_joined(request) != self.invert;
                }
            }
        };
        let ok = match (found, &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(m)) => m.matches(v),
        };
        ok != self.invert
    }

    fn matches_joined(&self, request: &Parts) -> bool {
        let joined: Vec<&str> = request
            .headers
            .get_all(&self.name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        self.value
            .as_ref()
            .is_none_or(|m| m.matches(&joined.join(",")))
    }
}

impl QueryMatch {
    fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == self.name).then_some(v)
            })
        });
        match (value, &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(m)) => m.matches(v),
        }
    }
}

impl StringMatch {
    /// True when `value` satisfies the condition.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(r) => whole(r, value),
        }
    }
}

/// Envoy's regex matches must cover the whole value.
fn whole(r: &regex::Regex, value: &str) -> bool {
    r.find(value)
        .is_some_and(|m| m.start() == 0 && m.end() == value.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, Request};

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid").into_parts().0
    }

    fn matcher(path: PathMatch, headers: Vec<HeaderMatch>, query: Vec<QueryMatch>) -> RouteMatch {
        RouteMatch {
            path,
            headers,
            query,
        }
    }

    #[test]
    fn paths_headers_and_queries() {
        let m = matcher(
            PathMatch::Prefix("/v2".into()),
            vec![HeaderMatch {
                name: HeaderName::from_static("x-canary"),
                is_method: false,
                value: Some(StringMatch::Exact("true".into())),
                invert: false,
            }],
            vec![QueryMatch {
                name: "debug".into(),
                value: None,
            }],
        );
        assert!(m.matches(&parts("/v2/items?debug", &[("x-canary", "true")])));
        assert!(
            !m.matches(&parts("/v2/items", &[("x-canary", "true")])),
            "query missing"
        );
        assert!(
            !m.matches(&parts("/v1?debug=1", &[("x-canary", "true")])),
            "path"
        );
        assert!(
            !m.matches(&parts("/v2?debug=1", &[("x-canary", "false")])),
            "header value"
        );
    }

    #[test]
    fn regexes_must_match_the_whole_value_and_invert_flips() {
        let r = regex::Regex::new("/api/v[0-9]+").expect("valid");
        let m = matcher(
            PathMatch::Regex(r),
            vec![HeaderMatch {
                name: HeaderName::from_static("x-debug"),
                is_method: false,
                value: None,
                invert: true,
            }],
            vec![],
        );
        assert!(m.matches(&parts("/api/v12", &[])));
        assert!(
            !m.matches(&parts("/api/v12/x", &[])),
            "partial match is no match"
        );
        assert!(
            !m.matches(&parts("/api/v1", &[("x-debug", "1")])),
            "inverted presence"
        );
    }

    #[test]
    fn method_is_matched_as_a_header() {
        let m = matcher(
            PathMatch::Prefix("/".into()),
            vec![HeaderMatch {
                name: HeaderName::from_static("x-method"),
                is_method: true,
                value: Some(StringMatch::Exact("POST".into())),
                invert: false,
            }],
            vec![],
        );
        let mut p = parts("/", &[]);
        assert!(!m.matches(&p));
        p.method = http::Method::POST;
        assert!(m.matches(&p));
    }
}
