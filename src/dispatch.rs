//! The services a server answers and their methods, found by `"Service.Method"`: the one
//! registry of the simulated network ([`labrpc`](crate::labrpc), tests only) and of the TCP
//! server ([`net::Server`](crate::net::Server)). Each network says what a handler is (what it
//! gets, how it answers) and adds its typed builders on its own handler type; this module only
//! names handlers and finds them.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::labcodec::{self, CodecError};

/// A typed method on the wire's bytes: decodes the arguments, runs the method, encodes its
/// reply.
pub type Codec = dyn Fn(&[u8]) -> Result<Vec<u8>, CodecError> + Send + Sync;

/// How a network runs a typed method: its handler type made from the method's [`Codec`],
/// answering a codec error the network's way.
pub trait Typed {
    fn typed(method: Box<Codec>) -> Arc<Self>;
}

/// A named set of methods (e.g. `Raft` with `RequestVote` and `AppendEntries`), each a
/// handler of type `H`.
pub struct Service<H: ?Sized> {
    name: String,
    methods: HashMap<String, Arc<H>>,
}

impl<H: ?Sized> Service<H> {
    pub fn new(name: impl Into<String>) -> Self {
        Service {
            name: name.into(),
            methods: HashMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds method `name`, replacing one of the same name.
    pub fn add_method(&mut self, name: &str, handler: Arc<H>) {
        self.methods.insert(name.to_string(), handler);
    }

    /// Adds method `name`: the handler gets the decoded arguments and returns the reply,
    /// which is encoded back to the caller (see the network's [`Typed`]).
    pub fn method<A, R, F>(mut self, name: &str, handler: F) -> Self
    where
        H: Typed,
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(A) -> R + Send + Sync + 'static,
    {
        let method = move |bytes: &[u8]| labcodec::encode(&handler(labcodec::decode(bytes)?));
        self.add_method(name, H::typed(Box::new(method)));
        self
    }
}

/// A server's services by name.
pub struct Services<H: ?Sized> {
    by_name: HashMap<String, Service<H>>,
}

impl<H: ?Sized> Default for Services<H> {
    fn default() -> Self {
        Services {
            by_name: HashMap::new(),
        }
    }
}

impl<H: ?Sized> Services<H> {
    /// Adds a service, replacing one of the same name.
    pub fn add(&mut self, service: Service<H>) {
        self.by_name.insert(service.name.clone(), service);
    }

    /// The handler of `svc_meth` (`"Service.Method"`). It is shared: the caller runs it after
    /// letting go of the registry, and a call that found a service replaced meanwhile finishes
    /// on the old one.
    pub fn find(&self, svc_meth: &str) -> Result<Arc<H>, NotFound> {
        let (service, method) = svc_meth
            .split_once('.')
            .ok_or_else(|| NotFound::BadName(svc_meth.to_string()))?;
        let methods = &self
            .by_name
            .get(service)
            .ok_or_else(|| NotFound::Service(service.to_string()))?
            .methods;
        methods
            .get(method)
            .cloned()
            .ok_or_else(|| NotFound::Method {
                service: service.to_string(),
                method: method.to_string(),
            })
    }
}

/// Why [`Services::find`] found no handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotFound {
    /// The name was not of the form `Service.Method`.
    BadName(String),
    /// No service of that name.
    Service(String),
    /// The service has no method of that name.
    Method { service: String, method: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    type Handler = dyn Fn(u32) -> u32 + Send + Sync;

    #[test]
    fn finds_a_method_by_service_and_method_name() {
        let mut double = Service::<Handler>::new("Arith");
        double.add_method("Double", Arc::new(|x| 2 * x));
        let mut services = Services::default();
        services.add(double);
        assert_eq!(services.find("Arith.Double").map(|h| h(21)), Ok(42));
        assert_eq!(
            services.find("Arith").err(),
            Some(NotFound::BadName("Arith".into()))
        );
        assert_eq!(
            services.find("Nope.Double").err(),
            Some(NotFound::Service("Nope".into()))
        );
        assert_eq!(
            services.find("Arith.Halve").err(),
            Some(NotFound::Method {
                service: "Arith".into(),
                method: "Halve".into()
            })
        );
    }

    #[test]
    fn a_service_added_again_replaces_the_old_one_but_not_a_handler_already_found() {
        let mut services = Services::<Handler>::default();
        let mut first = Service::<Handler>::new("S");
        first.add_method("M", Arc::new(|_| 1));
        services.add(first);
        let found = services.find("S.M").unwrap();
        let mut second = Service::<Handler>::new("S");
        second.add_method("M", Arc::new(|_| 2));
        services.add(second);
        assert_eq!(found(0), 1);
        assert_eq!(services.find("S.M").map(|h| h(0)), Ok(2));
    }
}
