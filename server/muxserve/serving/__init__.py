"""The serving stack: protocol adapters (http, grpc) over one data plane, scheduler and engines."""
