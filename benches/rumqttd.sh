# Sourced by benches/run.sh and benches/fanout.sh: the rumqttd 0.20 config
# both use (its example config, one MQTT 3.1.1 listener on loopback, no delay
# between accepted connections, 100 in flight per connection as the loadgen
# keeps, no Prometheus or console listener).
#
#   write_rumqttd_config FILE PORT
write_rumqttd_config() {
    cat >"$1" <<EOT
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:$2"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
dynamic_filters = true
EOT
}
