# The chat and Flannel image for docker-compose.yml (both tiers: `python -m chat serve`,
# `python -m flannel serve`).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY chat ./chat
COPY flannel ./flannel
RUN pip install --no-cache-dir .
# The browser client, served by both tiers on plain GETs of their client port.
COPY web ./web
ENV CHAT_WEB_ROOT=/app/web FLANNEL_WEB_ROOT=/app/web
USER nobody
EXPOSE 8765 8766 9100
