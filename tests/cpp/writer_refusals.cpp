// Each misuse of rv::CandidateWriter, one per line of output: the message
// the writer refuses it with (tests/python/test_writers.py checks them).
#include <iostream>
#include <string>

#include "resnet_verify/candidate.hpp"

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: writer_refusals OUT_DIR\n";
        return 2;
    }
    const auto refused = [](const char* what, auto attempt) {
        try {
            attempt();
            std::cout << what << ": accepted\n";
        } catch (const rv::Error& error) {
            std::cout << what << ": " << error.what() << "\n";
        }
    };
    rv::CandidateWriter writer(argv[1], "NCHW");
    const std::vector<float> four(4, 1.0f);
    writer.stage("relu", "ReLU", {1, 4}, four);
    refused("duplicate", [&] { writer.stage("relu", "ReLU", {1, 4}, four); });
    refused("shape", [&] { writer.stage("bn1", "BatchNorm2d", {1, 2, 2, 2}, four); });
    refused("name", [&] { writer.stage("", "ReLU", {1, 4}, four); });
    refused("path", [&] { writer.stage("../relu", "ReLU", {1, 4}, four); });
    refused("type", [&] { writer.stage("fc", "", {1, 4}, four); });
    refused("layout", [&] { rv::CandidateWriter other(std::string(argv[1]) + "-other", "NHCW"); });
    writer.close();
    refused("closed", [&] { writer.stage("fc", "Linear", {1, 4}, four); });
    refused("not a dump", [&] { rv::CandidateWriter other(std::string(argv[1]) + "/stages", "NCHW"); });
    return 0;
}
