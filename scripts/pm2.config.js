// pm2 ecosystem file for the StoryNet miner. From anywhere:
//   pm2 start scripts/pm2.config.js && pm2 save && pm2 startup   (then run the command it prints)
//   pm2 logs storynet-miner
// pm2 passes on the environment of the shell that runs `pm2 start`: export the API keys there.
// See docs/running.md (keys, logs, the health watchdog).
const path = require("path");

const root = path.resolve(__dirname, "..");

module.exports = {
  apps: [
    {
      name: "storynet-miner",
      cwd: root,
      script: path.join(root, ".venv", "bin", "python"),
      interpreter: "none", // script is the program to run, not a node script
      args: ["-m", "miner", "run", "--config", "config.yaml"],
      env: { PYTHONUNBUFFERED: "1" }, // log lines reach pm2 as they are written
      autorestart: true,
      // 1 s between restarts, growing to 15 s; back to none after 30 s of running.
      exp_backoff_restart_delay: 1000,
      // A run shorter than min_uptime is unstable; after max_restarts of those in a row pm2 gives up
      // (a broken config, an unregistered hotkey): `pm2 logs` says why.
      min_uptime: "60s",
      max_restarts: 100,
      // pm2 stops with SIGINT, then SIGKILL: time for the miner to stop cleanly (validators wait 60 s).
      kill_timeout: 90000,
      merge_logs: true,
    },
  ],
};
