# Build: docker build -t quota-gateway .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin quota-gateway

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 gateway
COPY --from=build /src/target/release/quota-gateway /usr/local/bin/quota-gateway
COPY config /etc/quota-gateway
USER gateway
ENV QUOTA_GATEWAY_CONFIG=/etc/quota-gateway/gateway.toml \
    QG_API_LISTEN=0.0.0.0:9000
# 9000: the API; 8080: the proxy (when [proxy] is configured); 9100: `demo-upstream`
EXPOSE 9000 8080
ENTRYPOINT ["quota-gateway"]
CMD ["serve"]
