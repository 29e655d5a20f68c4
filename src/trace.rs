//! The producer's trace context, stored with a job or run at enqueue so the
//! trace continues in whichever worker runs it.

/// The current OpenTelemetry context as a W3C `traceparent`, if it has a span.
#[cfg(feature = "otel")]
pub(crate) fn current_traceparent() -> Option<String> {
    crate::otel::traceparent_of(&opentelemetry::Context::current())
}

#[cfg(not(feature = "otel"))]
pub(crate) fn current_traceparent() -> Option<String> {
    None
}
